//! Scenario 1, the orchestrator singleton: a global `get_orchestrator()` that several threads call at once.
//!
//! The naive version is the incident's `if _orchestrator is None: _orchestrator =
//! Orchestrator()`: a check under one lock acquisition, a 10 ms build, a store
//! under another. Each build also starts a cleanup thread, so every extra
//! instance leaks a thread. `toctou::Singleton::get_or_init` builds once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use toctou::Singleton;

use crate::{Metric, Round, released_together};

/// The incident's orchestrator; what matters is that building one is slow and
/// starts a thread.
struct Orchestrator {
    _sessions: Mutex<Vec<String>>,
}

/// Counts builds and owns the cleanup threads they started.
#[derive(Default)]
struct Builds {
    built: AtomicU64,
    stop: Arc<AtomicBool>,
    cleanup_threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Builds {
    fn build(&self) -> Orchestrator {
        self.built.fetch_add(1, SeqCst);
        thread::sleep(Duration::from_millis(10));
        let stop = self.stop.clone();
        let cleanup = thread::spawn(move || {
            while !stop.load(SeqCst) {
                thread::sleep(Duration::from_millis(2));
            }
        });
        self.cleanup_threads.lock().unwrap().push(cleanup);
        Orchestrator {
            _sessions: Mutex::new(Vec::new()),
        }
    }

    /// Stops and joins the cleanup threads; returns (builds, threads).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, SeqCst);
        let threads = self.cleanup_threads.into_inner().unwrap();
        let started = threads.len() as u64;
        for thread in threads {
            thread.join().unwrap();
        }
        (self.built.into_inner(), started)
    }
}

fn metrics(builds: Builds, distinct: usize) -> Vec<Metric> {
    let (built, threads) = builds.finish();
    vec![
        Metric::expect("instances built", built, 1),
        Metric::expect("cleanup threads", threads, 1),
        Metric::expect("distinct instances seen", distinct as u64, 1),
    ]
}

pub fn round(workers: usize) -> Round {
    // Naive: check, then build and store. Every `Arc` handed out stays alive
    // until the count, so distinct instances have distinct addresses.
    let builds = Builds::default();
    let global: Mutex<Option<Arc<Orchestrator>>> = Mutex::new(None);
    let seen = released_together(workers, |_| {
        let existing = global.lock().unwrap().clone(); // time of check
        existing.unwrap_or_else(|| {
            let built = Arc::new(builds.build());
            *global.lock().unwrap() = Some(built.clone()); // time of use
            built
        })
    });
    let distinct = seen.iter().map(Arc::as_ptr).collect::<HashSet<_>>().len();
    let naive = metrics(builds, distinct);

    // toctou: the check and the build are one step.
    let builds = Builds::default();
    let global: Singleton<Orchestrator> = Singleton::new();
    let seen = released_together(workers, |_| {
        global.get_or_init(|| builds.build()) as *const Orchestrator as usize
    });
    let distinct = seen.into_iter().collect::<HashSet<_>>().len();
    let toctou = metrics(builds, distinct);

    Round {
        naive,
        toctou,
        ..Round::default()
    }
}
