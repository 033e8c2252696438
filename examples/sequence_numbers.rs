//! The sequence number incident in Rust: per-workflow sequence numbers, assigned under a
//! per-workflow lock taken from a lock map.
//!
//! Each `emit` locks its workflow, reads the highest sequence number stored
//! so far, awaits (the incident's database round trip), and stores max + 1. Ten
//! emits for a workflow nobody has seen yet run at once.
//!
//! - **naive**: the incident's `if workflow_id not in locks: locks[workflow_id] =
//!   Lock()`, written as a get-or-create in two steps (a check, an `.await`
//!   as the incident's event loop would allow, then the insert). Several emits
//!   each create "the" lock and each lock their own: duplicate sequence
//!   numbers. The map also keeps every workflow's lock forever.
//! - **toctou**: `KeyedLocks::lock_async`. One lock per key by construction,
//!   and the entry is gone once the last emit is done.
//!
//! Run: `cargo run --release --example sequence_numbers [-- --emits N]`.
//! Exits 1 if the `toctou` run shows a duplicate or a leftover entry.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use toctou::KeyedLocks;
use tokio::sync::Mutex as AsyncMutex;

/// The event store: every workflow's sequence numbers, in emit order.
#[derive(Default)]
struct Events(Mutex<BTreeMap<String, Vec<u64>>>);

impl Events {
    /// The incident's `get_max_event_sequence`: a database round trip.
    async fn max_sequence(&self, workflow: &str) -> u64 {
        let max = self
            .0
            .lock()
            .unwrap()
            .get(workflow)
            .and_then(|seqs| seqs.iter().max().copied())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(5)).await;
        max
    }

    /// The incident's `save_event`: another round trip before the row is there.
    async fn save(&self, workflow: &str, sequence: u64) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut events = self.0.lock().unwrap();
        events
            .entry(workflow.to_string())
            .or_default()
            .push(sequence);
    }

    fn sequences(&self, workflow: &str) -> Vec<u64> {
        let mut seqs = self
            .0
            .lock()
            .unwrap()
            .get(workflow)
            .cloned()
            .unwrap_or_default();
        seqs.sort_unstable();
        seqs
    }
}

/// The incident's lock map: check, then create, in two steps.
#[derive(Default)]
struct NaiveLocks {
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    created: Mutex<usize>,
}

impl NaiveLocks {
    async fn get_or_create(&self, workflow: &str) -> Arc<AsyncMutex<()>> {
        let exists = self.locks.lock().unwrap().contains_key(workflow);
        if !exists {
            // Anything that yields between the check and the insert (here
            // a yield, in the incident's code any `await` before it) lets another emit
            // run the same check.
            tokio::task::yield_now().await;
            let lock = Arc::new(AsyncMutex::new(()));
            *self.created.lock().unwrap() += 1;
            self.locks
                .lock()
                .unwrap()
                .insert(workflow.to_string(), lock.clone());
            return lock;
        }
        self.locks.lock().unwrap()[workflow].clone()
    }
}

async fn emit_naive(locks: &NaiveLocks, events: &Events, workflow: &str) {
    let lock = locks.get_or_create(workflow).await;
    let _held = lock.lock().await;
    let max = events.max_sequence(workflow).await;
    events.save(workflow, max + 1).await;
}

async fn emit_toctou(locks: &KeyedLocks<String>, events: &Events, workflow: &str) {
    let _held = locks.lock_async(workflow).await;
    let max = events.max_sequence(workflow).await;
    events.save(workflow, max + 1).await;
}

/// Sequence numbers that appear more than once.
fn duplicates(seqs: &[u64]) -> usize {
    seqs.windows(2).filter(|w| w[0] == w[1]).count()
}

fn parse_emits() -> usize {
    let mut args = std::env::args().skip(1);
    let mut emits = 10;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--emits" => {
                emits = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("--emits takes a positive number");
                        std::process::exit(2)
                    })
            }
            "--help" | "-h" => {
                println!("usage: sequence_numbers [--emits N]   (default 10)");
                std::process::exit(0)
            }
            other => {
                eprintln!("unknown argument {other:?}; try --help");
                std::process::exit(2)
            }
        }
    }
    emits
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let emits = parse_emits();
    let workflow = "wf-new";
    println!(
        "{emits} concurrent emits for a new workflow; reading the max and saving take 5 ms each\n"
    );

    let naive = Arc::new(NaiveLocks::default());
    let events = Arc::new(Events::default());
    let tasks: Vec<_> = (0..emits)
        .map(|_| {
            let (naive, events) = (naive.clone(), events.clone());
            tokio::spawn(async move { emit_naive(&naive, &events, workflow).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("emit panicked");
    }
    let naive_seqs = events.sequences(workflow);
    let naive_created = *naive.created.lock().unwrap();
    let naive_left = naive.locks.lock().unwrap().len();

    let locks = Arc::new(KeyedLocks::<String>::new());
    let events = Arc::new(Events::default());
    let tasks: Vec<_> = (0..emits)
        .map(|_| {
            let (locks, events) = (locks.clone(), events.clone());
            tokio::spawn(async move { emit_toctou(&locks, &events, workflow).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("emit panicked");
    }
    let toctou_seqs = events.sequences(workflow);
    let toctou_left = locks.len();

    println!(
        "{:<24} {:>13} {:>11} {:>13}  sequences",
        "lock map", "locks created", "duplicates", "entries left"
    );
    println!(
        "{:<24} {:>13} {:>11} {:>13}  {:?}",
        "naive check-then-create",
        naive_created,
        duplicates(&naive_seqs),
        naive_left,
        naive_seqs
    );
    let stats = locks.stats();
    println!(
        "{:<24} {:>13} {:>11} {:>13}  {:?}",
        "toctou::KeyedLocks",
        stats.peak_live_keys,
        duplicates(&toctou_seqs),
        toctou_left,
        toctou_seqs
    );
    println!(
        "\n(toctou's \"locks created\" is its peak of live keys: one entry, shared by all emits)"
    );

    let expected: Vec<u64> = (1..=emits as u64).collect();
    if toctou_seqs != expected || toctou_left != 0 {
        eprintln!("toctou: expected sequences 1..={emits} and no entry left");
        std::process::exit(1);
    }
}
