//! `FileLocks` across real processes: the test binary re-executes itself as
//! child processes (`current_exe()` plus the `TOCTOU_FL_ROLE` environment
//! variable, read by the `child_process_entry` test, which returns at once
//! when the variable is absent).
//!
//! Each test asserts what a broken protocol would violate: exact counts
//! after concurrent read-modify-writes, an empty directory afterwards,
//! exclusion against another process and against Python's `fcntl.flock`,
//! descriptors counted before and after. Timing is printed, never asserted
//! tightly. Miri cannot run processes or these syscalls: every test is
//! ignored under miri.
#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use toctou::{FileGuard, FileLocks};

const ROLE: &str = "TOCTOU_FL_ROLE";
const DIR: &str = "TOCTOU_FL_DIR";
const KEY: &str = "TOCTOU_FL_KEY";

/// A fresh, empty base directory for one test.
fn base(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "toctou-fl-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Starts this test binary as a child playing `role`.
fn spawn_child(role: &str, dir: &Path, key: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(DIR, dir)
        .env(KEY, key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("re-execute the test binary")
}

/// Reads the child's stdout until a line equal to `word`.
fn wait_for_line(child: &mut Child, word: &str) {
    let out = child.stdout.as_mut().unwrap();
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "child exited before printing {word}"
        );
        if line.trim_end().ends_with(word) {
            return;
        }
    }
}

/// The child side. Returns at once in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let key = std::env::var(KEY).unwrap();
    match role.as_str() {
        "counter" => child_counter(&dir),
        "hold" => {
            let locks = FileLocks::open(dir.join("locks")).unwrap();
            let _guard = locks.lock(&key).unwrap();
            println!("LOCKED");
            std::io::stdout().flush().unwrap();
            // Hold until the parent closes our stdin (or kills us).
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        "cancelled_futures" => child_cancelled_futures(&dir, &key),
        "churn" => child_churn(&dir),
        other => panic!("unknown role {other}"),
    }
}

const KEYS: [&str; 3] = ["alpha", "beta", "gamma"];
const THREADS: usize = 4;
const ROUNDS: usize = 30;
const PROCESSES: usize = 8;

/// 4 threads, each `ROUNDS` read-modify-writes of the counter file of a key,
/// under `lock(key)`, cycling over `KEYS`.
fn child_counter(dir: &Path) {
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let counters = dir.join("counters");
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (locks, counters) = (&locks, &counters);
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let key = KEYS[(t + round) % KEYS.len()];
                    let _guard = locks.lock(key).unwrap();
                    let file = counters.join(key);
                    let n: usize = std::fs::read_to_string(&file)
                        .map_or(0, |s| s.trim().parse().expect("a torn write"));
                    // Widen the race window a naive lock would lose.
                    std::thread::yield_now();
                    std::fs::write(&file, (n + 1).to_string()).unwrap();
                }
            });
        }
    });
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run processes")]
fn processes_and_threads_count_exactly_and_leave_the_directory_empty() {
    let dir = base("counter");
    std::fs::create_dir(dir.join("counters")).unwrap();
    let children: Vec<Child> = (0..PROCESSES)
        .map(|_| spawn_child("counter", &dir, ""))
        .collect();
    for mut child in children {
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success(), "a child failed");
    }
    let per_key = PROCESSES * THREADS * ROUNDS / KEYS.len();
    for key in KEYS {
        let n: usize = std::fs::read_to_string(dir.join("counters").join(key))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(n, per_key, "lost updates on {key}");
    }
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run processes")]
fn a_holder_killed_with_sigkill_releases_the_key() {
    let dir = base("kill");
    let mut child = spawn_child("hold", &dir, "victim");
    wait_for_line(&mut child, "LOCKED");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    assert!(
        locks.try_lock("victim").unwrap().is_none(),
        "the child holds it"
    );
    let got = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let guard = locks.lock("victim").unwrap();
            let at = Instant::now();
            drop(guard);
            at
        });
        std::thread::sleep(Duration::from_millis(20)); // let it block in flock
        let killed = Instant::now();
        child.kill().unwrap(); // SIGKILL
        let got = waiter.join().unwrap();
        got.saturating_duration_since(killed)
    });
    child.wait().unwrap();
    println!("acquired {got:?} after the SIGKILL (goal: under 100 ms)");
    assert!(got < Duration::from_secs(5), "took {got:?}");
    // The crashed holder's file was removed by the next user's release.
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run processes")]
fn try_lock_for_gives_up_on_a_key_held_by_another_process() {
    let dir = base("timeout");
    let mut child = spawn_child("hold", &dir, "busy");
    wait_for_line(&mut child, "LOCKED");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let timeout = Duration::from_millis(50);
    let start = Instant::now();
    assert!(locks.try_lock_for("busy", timeout).unwrap().is_none());
    let took = start.elapsed();
    assert!(
        locks
            .try_lock_shared_for("busy", timeout)
            .unwrap()
            .is_none()
    );
    println!("try_lock_for({timeout:?}) returned None after {took:?}");
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(1),
        "{took:?}"
    );
    drop(child.stdin.take()); // the child releases and exits
    assert!(child.wait().unwrap().success());
    let guard = locks.try_lock_for("busy", Duration::from_secs(5)).unwrap();
    assert!(guard.is_some(), "free once the child is gone");
    drop(guard);
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// In a child, so that no other test opens descriptors meanwhile: 1,000
/// `lock_async` futures, polled once while `key` is held by another process
/// (`hold` child) or by this one, then dropped.
fn child_cancelled_futures(dir: &Path, key: &str) {
    use std::future::Future;
    use std::task::{Context, Waker};
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let before = open_fds();
    let held_here = (key == "here").then(|| locks.lock(key).unwrap());
    let mut futures: Vec<_> = (0..1000)
        .map(|i| {
            if i % 2 == 0 {
                Box::pin(locks.lock_async(key)) as std::pin::Pin<Box<dyn Future<Output = _>>>
            } else {
                Box::pin(locks.lock_shared_async(key))
            }
        })
        .collect();
    let mut cx = Context::from_waker(Waker::noop());
    for f in &mut futures {
        assert!(f.as_mut().poll(&mut cx).is_pending(), "the key is held");
    }
    drop(futures);
    drop(held_here);
    let after = open_fds();
    assert_eq!(before, after, "descriptors left open");
    println!("FDS {before} {after}");
    // Nothing left in-process either: the key can be taken at once.
    if key == "here" {
        drop(locks.try_lock(key).unwrap().expect("free"));
    }
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run processes")]
fn cancelled_async_waiters_leave_no_descriptor_and_no_file() {
    // Held by this process: the futures queue in-process.
    let dir = base("cancel-here");
    let child = spawn_child("cancelled_futures", &dir, "here");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());

    // Held by another process: one future reaches the OS lock and polls it.
    let mut holder = spawn_child("hold", &dir, "there");
    wait_for_line(&mut holder, "LOCKED");
    let child = spawn_child("cancelled_futures", &dir, "there");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

const PYTHON_HOLDER: &str = r#"
import fcntl, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("LOCKED", flush=True)
sys.stdin.readline()            # the Rust side checks it is excluded
fcntl.flock(fd, fcntl.LOCK_UN)
print("RELEASED", flush=True)
sys.stdin.readline()            # the Rust side now holds the key
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("GOT-IT", flush=True)
except BlockingIOError:
    print("EXCLUDED", flush=True)
"#;

#[test]
#[cfg_attr(miri, ignore = "miri cannot run processes")]
fn python_fcntl_flock_excludes_and_is_excluded_in_keep_mode() {
    if Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_err()
    {
        println!("skipped: python3 is not on this machine");
        return;
    }
    let dir = base("python");
    let locks = FileLocks::builder()
        .keep_files(true)
        .open(dir.join("locks"))
        .unwrap();
    let mut py = Command::new("python3")
        .arg("-c")
        .arg(PYTHON_HOLDER)
        .arg(locks.path_of("shared-job"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_line(&mut py, "LOCKED");
    assert!(
        locks.try_lock("shared-job").unwrap().is_none(),
        "Python excludes us"
    );
    assert!(locks.try_lock_shared("shared-job").unwrap().is_none());
    writeln!(py.stdin.as_mut().unwrap()).unwrap();
    wait_for_line(&mut py, "RELEASED");
    let guard = locks
        .try_lock_for("shared-job", Duration::from_secs(5))
        .unwrap();
    assert!(guard.is_some(), "free after Python's unlock");
    writeln!(py.stdin.as_mut().unwrap()).unwrap();
    wait_for_line(&mut py, "EXCLUDED");
    drop(guard);
    assert!(py.wait().unwrap().success());
    assert!(
        locks.path_of("shared-job").exists(),
        "keep mode keeps the file"
    );
    assert_eq!(locks.prune().unwrap(), 1);
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn bad_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "",
        ".",
        "..",
        "a/b",
        "../../etc/passwd",
        "/etc/passwd",
        "\0",
        "a\0b",
        "~",
        "~~",
        "%2E",
        "x.lock",
        ".lock",
        "-",
        "_",
        " ",
        "é",
        "日本語",
        "a b",
        "\n",
        "CON",
        "a\\b",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    keys.push("k".repeat(100));
    keys.push("k".repeat(101));
    keys.push("/".repeat(66)); // 199-byte stem: encoded
    keys.push("/".repeat(67)); // 202-byte stem: hashed
    keys.push("x".repeat(1 << 20));
    keys.push("/".repeat(1 << 20));
    keys.extend((0u8..128).map(|b| (b as char).to_string()));
    keys.sort();
    keys.dedup();
    keys
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn any_key_stays_inside_the_directory_and_distinct_keys_never_share_a_file() {
    let dir = base("badkeys");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let keys = bad_keys();
    let mut names = std::collections::HashSet::new();
    for key in &keys {
        let path = locks.path_of(key);
        assert_eq!(path.parent(), Some(dir.join("locks").as_path()), "{path:?}");
        assert!(path.file_name().unwrap().len() <= 210);
        assert!(names.insert(path), "two keys share a file");
    }
    // All held at once: keys that shared a file would exclude each other.
    let guards: Vec<FileGuard<'_>> = keys
        .iter()
        .map(|k| {
            locks
                .try_lock(k)
                .unwrap()
                .expect("distinct keys are independent")
        })
        .collect();
    assert_eq!(entries(&dir.join("locks")).len(), keys.len());
    assert_eq!(
        entries(&dir),
        vec!["locks".to_owned()],
        "nothing outside dir"
    );
    for (guard, key) in guards.iter().zip(&keys) {
        assert_eq!(guard.key(), key);
    }
    drop(guards);
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn the_directory_checks_refuse_with_a_reason() {
    let dir = base("dirs");
    // Created if missing, mode 0o700, parents included.
    let nested = dir.join("a/b/locks");
    drop(FileLocks::open(&nested).unwrap());
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(
        std::fs::metadata(&nested).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let link = dir.join("link");
    std::os::unix::fs::symlink(&nested, &link).unwrap();
    let err = FileLocks::open(&link).unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
    // A trailing slash makes `lstat` and `O_NOFOLLOW` follow the link.
    let err = FileLocks::open(format!("{}/", link.display())).unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");

    // Writable by others: they could delete a held file. The sticky bit
    // (only a file's owner may delete it) makes it safe again.
    let open_to_all = dir.join("open-to-all");
    std::fs::create_dir(&open_to_all).unwrap();
    for mode in [0o777, 0o770] {
        std::fs::set_permissions(&open_to_all, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = FileLocks::open(&open_to_all).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("writable by users other"), "{err}");
        let locks = FileLocks::builder()
            .allow_writable_by_others(true)
            .open(&open_to_all)
            .unwrap();
        drop(locks.lock("ok").unwrap());
    }
    std::fs::set_permissions(&open_to_all, std::fs::Permissions::from_mode(0o1777)).unwrap();
    drop(FileLocks::open(&open_to_all).unwrap().lock("ok").unwrap());

    let file = dir.join("file");
    std::fs::write(&file, b"").unwrap();
    let err = FileLocks::open(&file).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");

    // Owned by another user.
    let me = std::fs::metadata(&dir).unwrap().uid();
    let other = if me == 0 {
        let foreign = dir.join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        let c = std::ffi::CString::new(foreign.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc_chown(c.as_ptr(), 4321, 4321) }, 0);
        foreign
    } else {
        PathBuf::from("/") // owned by root, not by us
    };
    let err = FileLocks::open(&other).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(err.to_string().contains("owned by uid"), "{err}");
    if me == 0 {
        let locks = FileLocks::builder()
            .allow_other_owner(true)
            .open(&other)
            .unwrap();
        drop(locks.lock("ok").unwrap());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

unsafe extern "C" {
    #[link_name = "chown"]
    fn libc_chown(path: *const std::ffi::c_char, uid: u32, gid: u32) -> i32;
}

/// A read-only directory: as root a mode does not make it read-only, so a
/// read-only bind mount is used (skipped with a reason when mounting is not
/// allowed); otherwise `chmod 0o500`. `FileLocks` works relative to the
/// directory descriptor it opened, so it is opened after the change.
#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn a_read_only_directory_is_an_error_with_context_and_a_failed_unlink_stays_correct() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = base("ro");
    let locks_dir = dir.join("locks");
    // A file left by an earlier holder (keeping mode), to be deleted later.
    let rw = FileLocks::builder()
        .keep_files(true)
        .open(&locks_dir)
        .unwrap();
    drop(rw.lock("job").unwrap());
    drop(rw);
    let root = std::fs::metadata(&dir).unwrap().uid() == 0;
    let mount = |args: &[&std::ffi::OsStr]| {
        Command::new("mount")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    let made_ro = if root {
        let d = locks_dir.as_os_str();
        mount(&["--bind".as_ref(), d, d]) && mount(&["-o".as_ref(), "remount,bind,ro".as_ref(), d])
    } else {
        std::fs::set_permissions(&locks_dir, std::fs::Permissions::from_mode(0o500)).is_ok()
    };
    let undo = || {
        if root {
            let _ = Command::new("umount").arg(&locks_dir).status();
        } else {
            let _ = std::fs::set_permissions(&locks_dir, std::fs::Permissions::from_mode(0o700));
        }
    };
    if !made_ro {
        undo();
        println!("skipped: cannot make a read-only directory here (mount refused)");
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }
    let locks = FileLocks::open(&locks_dir).unwrap();
    let err = locks.lock("other").unwrap_err();
    let text = err.to_string();
    undo_on_failure(&undo, || {
        assert!(
            text.contains("open") && text.contains("other.lock") && text.contains("\"other\""),
            "{text}"
        );
        // The existing file can be locked, but the release cannot delete
        // it: `unlock` reports that, and the lock is released anyway.
        let held = locks.lock("job").unwrap();
        let err = held.unlock().unwrap_err();
        assert!(err.to_string().contains("unlink"), "{err}");
        assert!(locks.try_lock("job").unwrap().is_some(), "released anyway");
    });
    drop(locks);
    undo();
    // The file left behind is accepted by the next locker, who deletes it.
    assert_eq!(entries(&locks_dir), vec!["job.lock".to_owned()]);
    let locks = FileLocks::open(&locks_dir).unwrap();
    drop(locks.lock("job").unwrap());
    assert_eq!(entries(&locks_dir), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `f`; if it panics, runs `undo` first (unmount), then re-panics.
fn undo_on_failure(undo: &dyn Fn(), f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        undo();
        std::panic::resume_unwind(panic);
    }
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn shared_and_exclusive_in_one_process() {
    let dir = base("modes");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let r1 = locks.lock_shared("k").unwrap();
    let r2 = locks.try_lock_shared("k").unwrap().unwrap();
    assert!(r1.is_shared() && r2.is_shared());
    assert!(locks.try_lock("k").unwrap().is_none());
    assert!(
        locks
            .try_lock_for("k", Duration::from_millis(5))
            .unwrap()
            .is_none()
    );
    drop(r1);
    assert!(locks.path_of("k").exists(), "a shared holder remains");
    drop(r2);
    assert!(
        !locks.path_of("k").exists(),
        "the last shared holder deletes it"
    );
    let w = locks.lock("k").unwrap();
    assert!(locks.try_lock_shared("k").unwrap().is_none());
    assert!(format!("{w:?}").contains("\"k\""));
    drop(w);
    // Threads contend: readers and writers, with a violation detector.
    let state = std::sync::Mutex::new((0usize, false));
    std::thread::scope(|s| {
        for t in 0..4 {
            let (locks, state) = (&locks, &state);
            s.spawn(move || {
                for i in 0..50 {
                    if (t + i) % 3 == 0 {
                        let _w = locks.lock("rw").unwrap();
                        let mut st = state.lock().unwrap();
                        assert!(st.0 == 0 && !st.1, "a writer with others");
                        st.1 = true;
                        drop(st);
                        std::thread::yield_now();
                        state.lock().unwrap().1 = false;
                    } else {
                        let _r = locks.lock_shared("rw").unwrap();
                        let mut st = state.lock().unwrap();
                        assert!(!st.1, "a reader with a writer");
                        st.0 += 1;
                        drop(st);
                        std::thread::yield_now();
                        state.lock().unwrap().0 -= 1;
                    }
                }
            });
        }
    });
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn async_locks_and_guards_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let dir = base("async");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let fut = locks.lock_async("a");
    assert_send(&fut);
    let guard = common::block_on(fut).unwrap();
    assert_send(&guard);
    let shared = common::block_on(locks.lock_shared_async("b")).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || drop((guard, shared)));
    });
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn owned_guards_are_static_outlive_the_callers_arc_and_release_on_drop() {
    fn assert_send_static<T: Send + 'static>(_: &T) {}
    let dir = base("owned");
    let locks = std::sync::Arc::new(FileLocks::open(dir.join("locks")).unwrap());
    let guard = locks.lock_owned("k").unwrap();
    assert_send_static(&guard);
    let fut = locks.lock_owned_async("other");
    assert_send(&fut);
    drop(fut);
    // The guard keeps the map alive after the caller's `Arc` is gone.
    let weak = std::sync::Arc::downgrade(&locks);
    let path = locks.path_of("k");
    drop(locks);
    assert!(weak.upgrade().is_some(), "the guard holds the map");
    let worker = std::thread::spawn(move || {
        assert_eq!(guard.key(), "k");
        assert!(path.exists(), "held");
        std::thread::sleep(Duration::from_millis(20));
        drop(guard);
        path
    });
    let path = worker.join().unwrap();
    assert!(weak.upgrade().is_none(), "the last guard dropped the map");
    assert!(!path.exists(), "released and deleted");
    // Shared owned guards, sync and async, exclude a writer of another map.
    let locks = std::sync::Arc::new(FileLocks::open(dir.join("locks")).unwrap());
    let other = FileLocks::open(dir.join("locks")).unwrap();
    let a = locks.lock_shared_owned("s").unwrap();
    let b = common::block_on(locks.lock_shared_owned_async("s")).unwrap();
    assert!(a.is_shared() && b.is_shared());
    assert!(other.try_lock("s").unwrap().is_none());
    drop(a);
    b.unlock().unwrap();
    assert!(other.try_lock("s").unwrap().is_some());
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn assert_send<T: Send>(_: &T) {}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn a_guard_moved_to_another_thread_is_waited_for() {
    // Issue 14: a guard this thread took and moved away counted as held by
    // this thread, whose next `lock` of the key panicked; the wait ends.
    let dir = base("moved");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    std::thread::scope(|s| {
        let held = locks.lock("k").unwrap();
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(held);
        });
        let again = locks.lock("k").unwrap();
        assert_eq!(again.key(), "k");
    });
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn a_panic_while_holding_releases_the_key() {
    let dir = base("unwind");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _held = locks.lock("k").unwrap();
        panic!("boom");
    }));
    assert!(result.is_err());
    assert!(
        locks.try_lock("k").unwrap().is_some(),
        "released during unwinding"
    );
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn keep_mode_keeps_files_and_prune_spares_held_ones() {
    let dir = base("keep");
    let locks = FileLocks::builder()
        .keep_files(true)
        .open(dir.join("locks"))
        .unwrap();
    for key in ["a", "b", "c/d"] {
        drop(locks.lock(key).unwrap());
    }
    std::fs::write(dir.join("locks").join("notes.txt"), b"not ours").unwrap();
    let held = locks.lock_shared("b").unwrap();
    assert_eq!(locks.prune().unwrap(), 2);
    assert_eq!(
        entries(&dir.join("locks")),
        vec!["b.lock".to_owned(), "notes.txt".to_owned()]
    );
    drop(held);
    assert_eq!(locks.prune().unwrap(), 1);

    // Odd entries: a directory at a lock name fails alone (the others are
    // still pruned, and the error names it); names the key mapping never
    // produces are left alone, even ending in `.lock`.
    for key in ["e", "f"] {
        drop(locks.lock(key).unwrap());
    }
    std::fs::create_dir(dir.join("locks").join("odd.lock")).unwrap();
    for foreign in ["a~b.lock", "~abc.lock", "%.lock"] {
        std::fs::write(dir.join("locks").join(foreign), b"not ours").unwrap();
    }
    let err = locks.prune().unwrap_err();
    assert!(err.to_string().contains("odd.lock"), "{err}");
    assert_eq!(
        entries(&dir.join("locks")),
        ["%.lock", "a~b.lock", "notes.txt", "odd.lock", "~abc.lock"].map(str::to_owned),
        "e and f pruned despite the directory; foreign names kept"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// This process's descriptors of lock files in `dir` (kept ones included),
/// read from `/proc/self/fd`: other tests' directories do not count.
fn fds_into(dir: &Path) -> usize {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.parent() == Some(dir.as_path()))
        .count()
}

/// Keep mode keeps released keys' descriptors open for their next lock, at
/// most `idle_descriptors`, and `prune` closes them; the deleting mode
/// keeps none.
#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn keep_mode_keeps_a_bounded_number_of_idle_descriptors() {
    let dir = base("idle");
    let locks = FileLocks::builder()
        .keep_files(true)
        .idle_descriptors(2)
        .open(&dir)
        .unwrap();
    for key in ["a", "b", "c", "d", "e"] {
        drop(locks.lock(key).unwrap());
    }
    assert_eq!(fds_into(&dir), 2, "the two last released are kept");
    let held = locks.lock("e").unwrap();
    assert_eq!(fds_into(&dir), 2, "e's kept descriptor is reused");
    let shared = locks.lock_shared("d").unwrap();
    assert_eq!(fds_into(&dir), 2, "so is d's, for a shared lock");
    drop((held, shared));
    assert_eq!(fds_into(&dir), 2);
    assert_eq!(locks.prune().unwrap(), 5);
    assert_eq!(fds_into(&dir), 0, "prune closes the kept descriptors");
    assert!(entries(&dir).is_empty());

    let deleting = FileLocks::open(dir.join("deleting")).unwrap();
    for key in ["a", "b"] {
        drop(deleting.lock(key).unwrap());
        drop(deleting.lock_shared(key).unwrap());
    }
    assert_eq!(
        fds_into(&dir.join("deleting")),
        0,
        "the deleting mode keeps none"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A try that finds the key held by another process keeps its descriptor
/// (keep mode) for the next try, so repeated tries, polling waits and
/// cancelled async waits neither open a descriptor each nor leave more
/// than one behind; the deleting mode keeps none.
#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn failed_tries_reuse_one_kept_descriptor() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let dir = base("idle-tries");
    let keep = || FileLocks::builder().keep_files(true).open(&dir).unwrap();
    let (holder, trier) = (keep(), keep());
    let held = holder.lock("k").unwrap();
    assert_eq!(fds_into(&dir), 1);
    for _ in 0..3 {
        assert!(trier.try_lock("k").unwrap().is_none());
        assert!(trier.try_lock_shared("k").unwrap().is_none());
        assert_eq!(fds_into(&dir), 2, "the holder's, and one kept by the trier");
    }
    assert!(
        trier
            .try_lock_for("k", Duration::from_millis(5))
            .unwrap()
            .is_none()
    );
    for _ in 0..100 {
        let mut wait = Box::pin(trier.lock_async("k"));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(fds_into(&dir), 2, "cancelled waits left no descriptor");
    drop(held);
    let mine = trier.lock("k").unwrap();
    assert_eq!(fds_into(&dir), 2, "the kept descriptor is locked now");
    drop(mine);

    let deleting = FileLocks::open(dir.join("deleting")).unwrap();
    let other = FileLocks::open(dir.join("deleting")).unwrap();
    let held = other.lock("k").unwrap();
    assert!(deleting.try_lock("k").unwrap().is_none());
    assert_eq!(fds_into(&dir.join("deleting")), 1, "only the holder's");
    drop(held);
    assert!(entries(&dir.join("deleting")).is_empty());
    assert_eq!(holder.prune().unwrap() + trier.prune().unwrap(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A kept descriptor is not trusted: after another party pruned (and maybe
/// re-created) the file, locking the key again re-checks the name, so the
/// two never both hold it. (Two `FileLocks` on one directory behave as two
/// processes: each has its own kept descriptors.)
#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn a_kept_descriptor_of_a_pruned_file_does_not_lock_the_key() {
    let dir = base("idle-pruned");
    let keep = || FileLocks::builder().keep_files(true).open(&dir).unwrap();
    let (a, b) = (keep(), keep());
    drop(a.lock("k").unwrap()); // a keeps k's descriptor
    assert_eq!(b.prune().unwrap(), 1, "b removes the unheld file");
    let held = a.lock("k").unwrap();
    assert!(a.path_of("k").exists(), "a locked a file at the name");
    assert!(b.try_lock("k").unwrap().is_none(), "and excludes b");
    drop(held);

    // Pruned and re-created: a's kept descriptor is of a deleted file.
    drop(a.lock("k").unwrap());
    assert_eq!(b.prune().unwrap(), 1);
    let b_holds = b.lock("k").unwrap();
    assert!(
        a.try_lock("k").unwrap().is_none(),
        "b holds the file at the name"
    );
    assert!(
        a.try_lock_for("k", Duration::from_millis(20))
            .unwrap()
            .is_none()
    );
    drop(b_holds);
    drop(a.lock("k").unwrap());
    assert_eq!(a.prune().unwrap(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `try_lock_shared` joins the shared lock that this process's other readers
/// hold without waiting for (or failing on) another caller's join.
#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn try_lock_shared_joins_this_processs_readers_while_others_come_and_go() {
    let dir = base("tryshared");
    let locks = FileLocks::open(&dir).unwrap();
    let first = locks.lock_shared("cfg").unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..2_000 {
                    let joined = locks.try_lock_shared("cfg").unwrap();
                    assert!(joined.is_some(), "a held shared lock refused a reader");
                    std::thread::yield_now();
                }
            });
        }
    });
    drop(first);
    assert!(
        !locks.path_of("cfg").exists(),
        "the last reader deleted the file"
    );
    std::fs::remove_dir(&dir).unwrap();
}

/// This thread's id, as `/proc/self/task/<tid>` names it.
fn tid() -> String {
    let link = std::fs::read_link("/proc/thread-self").unwrap();
    link.file_name().unwrap().to_string_lossy().into_owned()
}

/// Waits until thread `tid` of this process sleeps (state `S`): a thread
/// whose only blocking point is the in-process queue is then queued.
fn wait_until_sleeping(tid: &str) {
    let stat = format!("/proc/self/task/{tid}/stat");
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&stat).unwrap();
        let state = text.rsplit(')').next().unwrap().trim_start().chars().next();
        if state == Some('S') {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "thread {tid} never slept"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn a_release_hands_the_os_lock_to_a_waiting_thread_without_deleting_the_file() {
    // In the deleting mode a release to the OS unlinks the file. Handed over
    // in-process, the file stays: a descriptor of our own sees it linked
    // until the last holder, who has no waiter, deletes it. A hold longer
    // than the chain's time bound (5 ms) goes to the OS by design, and a
    // chain may end sooner (it is timed on the kernel's coarse clock, which
    // may tick during the hold), so an attempt that went to the OS is tried
    // again: one hand-over must be seen.
    use std::os::unix::fs::MetadataExt;
    let dir = base("handover");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let mut handed_over = None;
    for _attempt in 0..50 {
        let first = locks.lock("k").unwrap();
        let taken = Instant::now();
        let file = std::fs::File::open(locks.path_of("k")).unwrap();
        let linked = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (got_tx, got_rx) = std::sync::mpsc::channel();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let locks = &locks;
            s.spawn(move || {
                tx.send(tid()).unwrap();
                let second = locks.lock("k").unwrap();
                got_tx.send(()).unwrap();
                let _ = done_rx.recv();
                drop(second);
            });
            wait_until_sleeping(&rx.recv().unwrap());
            let in_time = taken.elapsed() < Duration::from_millis(4);
            drop(first);
            got_rx.recv().unwrap();
            let linked = file.metadata().unwrap().nlink();
            drop(done_tx);
            in_time.then_some(linked)
        });
        assert_eq!(
            file.metadata().unwrap().nlink(),
            0,
            "the last holder deletes it"
        );
        if let Some(linked) = linked {
            handed_over = Some(linked == 1);
            if linked == 1 {
                break;
            }
        }
    }
    assert_eq!(
        handed_over,
        Some(true),
        "handed over: the file was neither deleted nor re-created (None: no \
         attempt held the key for less than 4 ms; false: every one went to \
         the OS)"
    );
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run these syscalls")]
fn a_release_does_not_park_the_lock_for_a_task_that_may_not_run_soon() {
    // A task at the front of the queue runs only when its executor polls
    // it; a lock parked for it would keep other processes out meanwhile.
    // A second `FileLocks` of the directory excludes this one as another
    // process would.
    use std::future::Future;
    use std::task::{Context, Waker};
    let dir = base("task-front");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let other = FileLocks::open(dir.join("locks")).unwrap();
    let held = locks.lock("k").unwrap();
    let mut waiting = Box::pin(locks.lock_async("k"));
    assert!(
        waiting
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    );
    drop(held);
    let got = other.try_lock("k").unwrap();
    assert!(
        got.is_some(),
        "the lock was parked for a task that is not running"
    );
    drop(got);
    drop(waiting);
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run processes")]
fn a_chain_of_in_process_hand_overs_does_not_starve_another_process() {
    // Two threads of this process take the key in turns, each always queued
    // when the other releases: without the chain's bound the OS lock would
    // never leave this process. A child process must still get the key.
    let dir = base("chain");
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    let waited = std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let _guard = locks.lock("hot").unwrap();
                    rounds.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(50));
                }
            });
        }
        while rounds.load(Ordering::Relaxed) < 100 {
            std::thread::yield_now();
        }
        let start = Instant::now();
        let mut child = spawn_child("hold", &dir, "hot");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            let locked = lines.any(|l| l.is_ok_and(|l| l.ends_with("LOCKED")));
            let _ = tx.send(locked);
        });
        let got = rx.recv_timeout(Duration::from_secs(20));
        let waited = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        drop(child.stdin.take());
        if got.is_err() {
            let _ = child.kill();
        }
        let _ = child.wait();
        assert_eq!(got, Ok(true), "the child never got the key");
        waited
    });
    println!(
        "the child got the key after {waited:?}, with {} in-process rounds",
        rounds.load(Ordering::Relaxed)
    );
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// In a child, so that no other test opens descriptors meanwhile: 4 threads
/// lock, time out, cancel async waits and lock shared over two keys, so
/// that hand-overs meet waiters that give up. Afterwards no descriptor is
/// open, no file is left, and another `FileLocks` of the directory (which
/// excludes this one as another process would) gets both keys at once.
fn child_churn(dir: &Path) {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let locks = FileLocks::open(dir.join("locks")).unwrap();
    let before = open_fds();
    std::thread::scope(|s| {
        for t in 0..4usize {
            let locks = &locks;
            s.spawn(move || {
                for i in 0..400usize {
                    let key = ["a", "b"][(i / 3 + t) % 2];
                    let held = match (i * 7 + t) % 5 {
                        0 => Some(locks.lock(key).unwrap()),
                        1 => locks
                            .try_lock_for(key, Duration::from_micros((i % 4 * 40) as u64))
                            .unwrap(),
                        2 => locks
                            .try_lock_shared_for(key, Duration::from_micros((i % 3 * 30) as u64))
                            .unwrap(),
                        3 => {
                            let mut fut = std::pin::pin!(locks.lock_async(key));
                            match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                                Poll::Ready(guard) => Some(guard.unwrap()),
                                Poll::Pending => None, // cancelled
                            }
                        }
                        _ => Some(locks.lock_shared(key).unwrap()),
                    };
                    if held.is_some() {
                        std::thread::sleep(Duration::from_micros((i % 3 * 20) as u64));
                    }
                }
            });
        }
    });
    assert_eq!(open_fds(), before, "a descriptor was left open");
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    let other = FileLocks::open(dir.join("locks")).unwrap();
    let a = other.try_lock("a").unwrap();
    let b = other.try_lock("b").unwrap();
    assert!(a.is_some() && b.is_some(), "a lock stayed parked");
    println!("CHURN OK");
}

#[test]
#[cfg_attr(miri, ignore = "miri cannot run processes")]
fn waiters_that_give_up_during_hand_overs_leave_nothing_behind() {
    let dir = base("churn");
    let mut child = spawn_child("churn", &dir, "");
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "the churn child failed");
    assert_eq!(entries(&dir.join("locks")), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}
