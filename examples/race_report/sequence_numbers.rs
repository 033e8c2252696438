//! Scenario 5, workflow sequence numbers: per-workflow sequence numbers, assigned under a per-workflow
//! lock taken from a lock map, by concurrent async emits.
//!
//! Each emit locks its workflow, reads the highest sequence number stored so
//! far, awaits (the database round trip), and stores max + 1.
//!
//! - **naive**: the incident's `if workflow_id not in locks: locks[workflow_id] =
//!   Lock()`, a check and an insert with an `.await` point between them.
//!   Several emits each create "the" lock and each lock their own, so they
//!   read the same max: duplicate sequence numbers. The map also keeps the
//!   lock forever.
//! - **toctou**: `KeyedLocks::lock_async`. One lock per key by construction,
//!   and no entry left once the last emit is done.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use toctou::KeyedLocks;
use tokio::sync::Mutex as AsyncMutex;

use crate::{Metric, Round};

const WORKFLOW: &str = "wf-42";

/// The event store's sequence numbers for one workflow.
#[derive(Default)]
struct Events(Mutex<Vec<u64>>);

impl Events {
    /// `get_max_event_sequence`, then `save_event(max + 1)`: two round trips.
    async fn append_next(&self) {
        let max = self.0.lock().unwrap().iter().copied().max().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.0.lock().unwrap().push(max + 1);
    }

    /// How many of the numbers 1..=`emits` were never stored.
    fn missing(&self, emits: usize) -> u64 {
        let stored = self.0.lock().unwrap();
        (1..=emits as u64).filter(|n| !stored.contains(n)).count() as u64
    }

    /// Sequence numbers stored more than once.
    fn duplicates(&self) -> u64 {
        let mut seqs = self.0.lock().unwrap().clone();
        seqs.sort_unstable();
        seqs.windows(2).filter(|w| w[0] == w[1]).count() as u64
    }
}

/// The incident's lock map: check, then create.
#[derive(Default)]
struct NaiveLocks {
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    created: AtomicU64,
}

impl NaiveLocks {
    async fn get_or_create(&self, workflow: &str) -> Arc<AsyncMutex<()>> {
        if let Some(lock) = self.locks.lock().unwrap().get(workflow) {
            return lock.clone(); // time of check
        }
        // Whatever the emit awaits before the insert lets the other emits
        // run the same check.
        tokio::task::yield_now().await;
        let lock = Arc::new(AsyncMutex::new(()));
        self.created.fetch_add(1, SeqCst);
        self.locks
            .lock()
            .unwrap()
            .insert(workflow.to_owned(), lock.clone()); // time of use
        lock
    }
}

pub fn round(emits: usize) -> Round {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let (locks, events) = (Arc::new(NaiveLocks::default()), Arc::new(Events::default()));
        let tasks: Vec<_> = (0..emits)
            .map(|_| {
                let (locks, events) = (locks.clone(), events.clone());
                tokio::spawn(async move {
                    let lock = locks.get_or_create(WORKFLOW).await;
                    let _held = lock.lock().await;
                    events.append_next().await;
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let naive = vec![
            Metric::expect("locks created", locks.created.load(SeqCst), 1),
            Metric::expect("duplicate sequences", events.duplicates(), 0),
            Metric::expect("missing from 1..=N", events.missing(emits), 0),
            // The incident's map keeps every workflow's lock forever.
            Metric::expect("entries left", locks.locks.lock().unwrap().len() as u64, 0),
        ];

        let (locks, events) = (
            Arc::new(KeyedLocks::<String>::new()),
            Arc::new(Events::default()),
        );
        let tasks: Vec<_> = (0..emits)
            .map(|_| {
                let (locks, events) = (locks.clone(), events.clone());
                tokio::spawn(async move {
                    let _held = locks.lock_async(WORKFLOW).await;
                    events.append_next().await;
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let toctou = vec![
            Metric::expect("duplicate sequences", events.duplicates(), 0),
            Metric::expect("missing from 1..=N", events.missing(emits), 0),
            Metric::expect("entries left", locks.len() as u64, 0),
        ];
        Round {
            naive,
            toctou,
            ..Round::default()
        }
    })
}
