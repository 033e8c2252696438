//! The context files incident: agents read and rewrite shared context files
//! concurrently. Readers of a file may run together; a writer must be alone.
//!
//! Writers rewrite a file in place (truncate, then write its lines one by
//! one, as a program that streams its output does); readers read the whole
//! file and check that every line comes from one generation and that none is
//! missing.
//!
//! - **naive**: no lock; readers see half-written files (torn reads).
//! - **toctou**: `KeyedRwLocks<PathBuf>`: `read(path)` around each read,
//!   `write(path)` around each rewrite. No torn read, several readers of one
//!   file at once, and no entry left when everybody is done.
//!
//! Run: `cargo run --release --example context_files`. Exits 1 if the
//! `toctou` run shows a torn read or a leftover entry.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use toctou::KeyedRwLocks;

const FILES: usize = 3;
const LINES: usize = 8;
const WRITERS: usize = 2;
const READERS: usize = 4;
const WRITES_PER_WRITER: usize = 40;

/// Rewrites `path` with generation `generation`, one line at a time.
fn rewrite(path: &Path, generation: usize) {
    let mut file = fs::File::create(path).expect("create context file");
    for line in 0..LINES {
        writeln!(file, "generation {generation} line {line}").expect("write context file");
        file.flush().expect("flush context file");
        thread::sleep(Duration::from_micros(50));
    }
}

/// Whether a read saw a whole file from one generation.
fn is_whole(text: &str) -> bool {
    let lines: Vec<&str> = text.lines().collect();
    let generation = |line: &str| line.split(' ').nth(1).map(str::to_owned);
    lines.len() == LINES && lines.iter().all(|l| generation(l) == generation(lines[0]))
}

#[derive(Default)]
struct Outcome {
    reads: AtomicUsize,
    torn: AtomicUsize,
    writes: AtomicUsize,
    /// Readers inside one file at the same moment, at most.
    max_shared: AtomicUsize,
}

/// Runs the writers and readers, with each access under `files`' lock for
/// its path, or under no lock at all.
fn run(paths: &[PathBuf], files: Option<&KeyedRwLocks<PathBuf>>) -> (Outcome, Duration) {
    for path in paths {
        rewrite(path, 0);
    }
    let outcome = Outcome::default();
    let inside: Vec<AtomicUsize> = paths.iter().map(|_| AtomicUsize::new(0)).collect();
    let writers_left = AtomicUsize::new(WRITERS);
    let start = Instant::now();
    thread::scope(|s| {
        for w in 0..WRITERS {
            let (outcome, writers_left) = (&outcome, &writers_left);
            s.spawn(move || {
                for round in 0..WRITES_PER_WRITER {
                    let path = &paths[(w + round) % paths.len()];
                    let _held = files.map(|f| f.write(path));
                    rewrite(path, 1 + w * WRITES_PER_WRITER + round);
                    outcome.writes.fetch_add(1, Relaxed);
                }
                writers_left.fetch_sub(1, Relaxed);
            });
        }
        for r in 0..READERS {
            let (outcome, inside, writers_left) = (&outcome, &inside, &writers_left);
            s.spawn(move || {
                let mut i = r;
                while writers_left.load(Relaxed) > 0 {
                    i += 1;
                    let at = i % paths.len();
                    let _held = files.map(|f| f.read(&paths[at]));
                    let now_inside = inside[at].fetch_add(1, Relaxed) + 1;
                    outcome.max_shared.fetch_max(now_inside, Relaxed);
                    let text = fs::read_to_string(&paths[at]).expect("read context file");
                    thread::sleep(Duration::from_micros(200));
                    inside[at].fetch_sub(1, Relaxed);
                    outcome.reads.fetch_add(1, Relaxed);
                    if !is_whole(&text) {
                        outcome.torn.fetch_add(1, Relaxed);
                    }
                }
            });
        }
    });
    (outcome, start.elapsed())
}

fn main() {
    let dir = std::env::temp_dir().join(format!("toctou-context-files-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("create temp dir");
    let paths: Vec<PathBuf> = (0..FILES)
        .map(|i| dir.join(format!("context-{i}.md")))
        .collect();
    println!(
        "{WRITERS} writers rewrite {FILES} files line by line, {READERS} readers check every read\n"
    );

    let (naive, naive_time) = run(&paths, None);
    let files = KeyedRwLocks::<PathBuf>::new();
    let (safe, safe_time) = run(&paths, Some(&files));
    let left = files.len();
    fs::remove_dir_all(&dir).ok();

    println!(
        "{:<22} {:>6} {:>10} {:>7} {:>22} {:>13} {:>8}",
        "locking", "reads", "torn reads", "writes", "readers of one file", "entries left", "wall"
    );
    for (name, o, time, left) in [
        ("none (naive)", &naive, naive_time, "-".to_string()),
        ("toctou::KeyedRwLocks", &safe, safe_time, left.to_string()),
    ] {
        println!(
            "{:<22} {:>6} {:>10} {:>7} {:>22} {:>13} {:>6}ms",
            name,
            o.reads.load(Relaxed),
            o.torn.load(Relaxed),
            o.writes.load(Relaxed),
            o.max_shared.load(Relaxed),
            left,
            time.as_millis()
        );
    }

    if safe.torn.load(Relaxed) != 0 || left != 0 {
        eprintln!("toctou: a torn read or a leftover entry");
        std::process::exit(1);
    }
}
