//! The orchestrator incident: a global `get_orchestrator()` that 10 threads call at once.
//!
//! The naive version checks and then fills a `Mutex<Option<Arc<_>>>` under two
//! separate lock acquisitions: the Python incident's `if _orchestrator is None:
//! _orchestrator = Orchestrator()`, written in safe Rust. It builds several
//! orchestrators, each with its own sessions map and its own cleanup thread.
//! The `toctou::Singleton` version builds exactly one.
//!
//! ```text
//! cargo run --release --example orchestrator [-- --threads N]
//! ```
//!
//! Exits non-zero if the `toctou` version ever builds more than one instance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use toctou::Singleton;

/// The incident's orchestrator: a sessions map, and a cleanup thread per instance.
struct Orchestrator {
    sessions: Mutex<HashMap<String, u64>>,
}

/// Counters for one variant: instances built and cleanup threads started.
struct Counters {
    created: AtomicUsize,
    cleanup_threads: AtomicUsize,
}

static STOP_CLEANUP: AtomicBool = AtomicBool::new(false);

impl Orchestrator {
    /// Builds an orchestrator the way the incident's code did: slowly (the constructor
    /// does real work), and with a background cleanup thread of its own.
    fn new(counters: &'static Counters) -> Self {
        counters.created.fetch_add(1, SeqCst);
        thread::sleep(Duration::from_millis(10));
        counters.cleanup_threads.fetch_add(1, SeqCst);
        thread::spawn(|| {
            while !STOP_CLEANUP.load(SeqCst) {
                thread::sleep(Duration::from_millis(5));
            }
        });
        Orchestrator {
            sessions: Mutex::new(HashMap::new()),
        }
    }
}

static NAIVE_COUNTERS: Counters = Counters {
    created: AtomicUsize::new(0),
    cleanup_threads: AtomicUsize::new(0),
};
static TOCTOU_COUNTERS: Counters = Counters {
    created: AtomicUsize::new(0),
    cleanup_threads: AtomicUsize::new(0),
};

/// The incident's bug in safe Rust: check under one lock, build, fill under another.
fn naive_get_orchestrator() -> Arc<Orchestrator> {
    static NAIVE: Mutex<Option<Arc<Orchestrator>>> = Mutex::new(None);
    if let Some(existing) = NAIVE.lock().unwrap().as_ref() {
        return existing.clone(); // time of check ...
    }
    let built = Arc::new(Orchestrator::new(&NAIVE_COUNTERS));
    *NAIVE.lock().unwrap() = Some(built.clone()); // ... time of use
    built
}

/// The fix: one call, no window between the check and the act.
fn get_orchestrator() -> &'static Orchestrator {
    static ORCHESTRATOR: Singleton<Orchestrator> = Singleton::new();
    ORCHESTRATOR.get_or_init(|| Orchestrator::new(&TOCTOU_COUNTERS))
}

/// Releases `threads` threads together; each records a session in the
/// orchestrator it got. Returns the number of distinct orchestrators seen.
fn run(threads: usize, get: fn(usize) -> usize) -> usize {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                get(i)
            })
        })
        .collect();
    let mut seen: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

fn parse_threads() -> usize {
    let mut args = std::env::args().skip(1);
    let mut threads = 10;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threads" => {
                threads = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage("--threads needs a positive number"));
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    threads
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("error: {problem}");
    }
    eprintln!("usage: orchestrator [--threads N]   (default 10)");
    std::process::exit(if problem.is_empty() { 0 } else { 2 })
}

fn main() {
    let threads = parse_threads();

    let naive_seen = run(threads, |i| {
        let o = naive_get_orchestrator();
        o.sessions
            .lock()
            .unwrap()
            .insert(format!("session-{i}"), i as u64);
        Arc::as_ptr(&o) as usize
    });
    let toctou_seen = run(threads, |i| {
        let o = get_orchestrator();
        o.sessions
            .lock()
            .unwrap()
            .insert(format!("session-{i}"), i as u64);
        o as *const Orchestrator as usize
    });
    STOP_CLEANUP.store(true, SeqCst);

    let report = |name: &str, counters: &Counters, seen: usize| {
        println!(
            "{name:<28} threads: {threads}  orchestrators created: {}  cleanup threads: {}  distinct instances seen: {seen}",
            counters.created.load(SeqCst),
            counters.cleanup_threads.load(SeqCst),
        );
    };
    report("naive (check, then fill):", &NAIVE_COUNTERS, naive_seen);
    report("toctou::Singleton:", &TOCTOU_COUNTERS, toctou_seen);

    let sessions = get_orchestrator().sessions.lock().unwrap().len();
    println!("toctou: all {sessions} sessions landed in the one orchestrator");

    let toctou_created = TOCTOU_COUNTERS.created.load(SeqCst);
    if toctou_created != 1 || toctou_seen != 1 || sessions != threads {
        eprintln!("FAIL: toctou::Singleton built {toctou_created} orchestrators");
        std::process::exit(1);
    }
}
