//! A downstream user's loom model, exactly as the crate docs and the README
//! show it: the user's own code (`registry`) model-checked through toctou's
//! real protocol. Under `--cfg toctou_loom` it runs in loom; without it, the
//! same code runs once as a plain test.
//!
//! ```text
//! RUSTFLAGS="--cfg toctou_loom" cargo test --release --test loom_downstream
//! ```

#[cfg(toctou_loom)]
use loom::{model, sync::Arc, thread};
#[cfg(not(toctou_loom))]
use std::{sync::Arc, thread};
#[cfg(not(toctou_loom))]
fn model(f: impl Fn()) {
    f()
}

use std::sync::atomic::{AtomicUsize, Ordering};
use toctou::Singleton;

// Your code: a registry that must be built once.
fn registry(cell: &Singleton<Vec<&'static str>>, builds: &AtomicUsize) -> usize {
    cell.get_or_init(|| {
        builds.fetch_add(1, Ordering::Relaxed);
        vec!["openai", "anthropic"]
    })
    .len()
}

#[test]
fn registry_is_built_once() {
    model(|| {
        let cell = Arc::new(Singleton::new());
        let builds = Arc::new(AtomicUsize::new(0));
        let other = {
            let (cell, builds) = (cell.clone(), builds.clone());
            thread::spawn(move || registry(&cell, &builds))
        };
        assert_eq!(registry(&cell, &builds), 2);
        assert_eq!(other.join().unwrap(), 2);
        assert_eq!(builds.load(Ordering::Relaxed), 1, "built exactly once");
    });
}
