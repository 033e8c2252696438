//! Concurrency primitives that make check-then-act races impossible by
//! construction.
//!
//! A time-of-check to time-of-use (TOCTOU) race is two steps that must be one:
//! `if instance is None: instance = build()`, `if key not in locks: locks[key]
//! = Lock()`, "is the server running? no? start it". Two threads pass the check
//! before either acts, and the service ends up with four orchestrators, two
//! model servers on one port, or duplicate sequence numbers. Each `toctou`
//! primitive makes the check and the act one atomic step, and the loom suite in
//! the repository checks every interleaving of that step.
//!
//! # Primitives
//!
//! | you wrote | race report | use |
//! |---|---|---|
//! | `if INSTANCE is None: INSTANCE = Build()` (a global singleton) | 1 | [`Singleton<T>`] |
//! | a global built from a function on first use | | [`Lazy<T, F>`] |
//! | "is the server for this model running? no? start it" | 2 | [`SingletonMap<K, V>`] |
//! | "is this task pending? yes? claim it"; read-modify-write of a shared file | 3 | [`KeyedLocks<K>`], [`KeyedRwLocks<K>`] |
//! | `if registry is None or settings is not None: registry = Registry(settings)` | 4 | [`RegistryCell<T, S>`] |
//! | `if key not in locks: locks[key] = Lock()` (a lock per key) | 5 | [`KeyedLocks<K>`] |
//! | the same per-key lock, but the parties are separate processes on one machine (workers, CLIs, a Python agent with `fcntl.flock`) | | [`FileLocks`] (Linux) |
//!
//! # Try it
//!
//! In a clone of the repository, two commands:
//!
//! ```text
//! cargo run --release --example race_report
//! cargo test --workspace
//! ```
//!
//! The first runs the five production bugs this crate was built against
//! (numbered as in the table above: a singleton, a model server manager, a
//! task queue, a provider registry, a per-workflow lock map), once with the
//! naive check-then-act code and once with `toctou`, and prints what each
//! measured: for example 10 orchestrators built by 10 threads against 1, or
//! 200 provider registries for 200 workers against 1. It exits 1 if a
//! `toctou` row shows a symptom.
//!
//! # Quick start
//!
//! ```
//! use toctou::{Lazy, Singleton};
//!
//! struct Orchestrator;
//!
//! static ORCHESTRATOR: Singleton<Orchestrator> = Singleton::new();
//! static DEFAULT_PORT: Lazy<u16> = Lazy::new(|| 10507);
//!
//! let a = ORCHESTRATOR.get_or_init(|| Orchestrator);
//! let b = ORCHESTRATOR.get_or_init(|| unreachable!("built once"));
//! assert!(std::ptr::eq(a, b));
//! assert_eq!(*DEFAULT_PORT, 10507);
//!
//! // One model server per model, however many chats ask at once.
//! let servers: toctou::SingletonMap<String, u16> = toctou::SingletonMap::new();
//! let port = servers.get_or_init("phi-4", |_| 8080);
//! assert_eq!(*servers.get_or_init("phi-4", |_| unreachable!("started once")), *port);
//!
//! // One lock per workflow id, created on demand, gone when unused.
//! let workflows: toctou::KeyedLocks<String> = toctou::KeyedLocks::new();
//! let held = workflows.lock("wf-1");
//! assert!(workflows.try_lock("wf-1").is_none());
//! drop(held);
//! assert!(workflows.is_empty());
//!
//! // Readers share a file's key; a writer has it alone.
//! let files: toctou::KeyedRwLocks<String> = toctou::KeyedRwLocks::new();
//! let (r1, r2) = (files.read("notes.md"), files.read("notes.md"));
//! assert!(files.try_write("notes.md").is_none());
//! drop((r1, r2));
//!
//! // A registry built once, then rebuilt only on an explicit settings change.
//! static REGISTRY: toctou::RegistryCell<Vec<String>, Vec<String>> =
//!     toctou::RegistryCell::new(|providers| providers.clone());
//! assert!(REGISTRY.get().is_empty()); // built from the default settings
//! REGISTRY.reinit_if_changed(vec!["openai".to_owned()]);
//! assert_eq!(REGISTRY.get().len(), 1);
//! assert_eq!(REGISTRY.generation(), 2);
//! ```
//!
//! Each type's page has a longer example, and the repository's `examples/`
//! directory has one program per bug.
//!
//! # Semantics
//!
//! | situation | [`Singleton`] / [`Lazy`] | [`SingletonMap`] | [`KeyedLocks`] / [`KeyedRwLocks`] | [`RegistryCell`] |
//! |---|---|---|---|---|
//! | init panics | the panic reaches that caller; the cell stays empty and retryable (no poisoning) | the same, per key | a holder's panic releases its key during unwinding; no poisoning | the current instance stays; the panic reaches the caller |
//! | init returns `Err` | returned to that caller only, not stored; a waiter runs its own init | the same, per key | nothing to fail: `lock` creates the entry | `try_reinit`: `Err` to the caller, nothing changes |
//! | a waiting caller is cancelled | a dropped async waiter leaves nothing; a dropped initialiser hands over to one waiter | the same, per key | a dropped async waiter leaves the queue; a key already handed to it goes to the next waiter | no async API: reads never wait after the first build |
//! | reentrancy (same thread) | init of the same cell **panics** with a message | init of the same key **panics** | not detected: guards are `Send` and may have moved to a thread that releases them, so a thread that locks a key it holds itself waits forever, as with `std::sync::Mutex` | a build that reinitialises its own cell **panics** |
//! | timeouts | `get` never waits; async waits can be dropped by any runtime's timeout | the same | `try_lock_for`, `try_read_for`, `try_write_for`: `None` on timeout, nothing left behind | reads never wait after the first build |
//!
//! Reentrancy here always means a call on the same thread; a cycle through
//! another thread or task is not detected and deadlocks (see
//! [Guarantees](#guarantees)). [`docs::semantics`] compares every primitive
//! with `std`'s `OnceLock` and `LazyLock`, `once_cell`, tokio's `OnceCell`,
//! dashmap, moka, lockmap and arc-swap, case by case.
//!
//! # Guarantees
//!
//! - **No poisoning.** A panicking initialiser leaves the cell empty and
//!   retryable; the panic reaches the caller that ran it.
//! - **Errors are not cached.** A failed fallible initialiser leaves the cell
//!   empty; one waiting caller runs its own.
//! - **Cancellation-safe async.** Dropping an initialising future hands the
//!   work to one waiter; dropping a waiting future leaves nothing behind.
//!   The async API is runtime-agnostic: the crate depends on no runtime.
//! - **Same-thread reentrancy panics instead of deadlocking.** An initialiser
//!   that calls back into its own cell (or its own key) on the thread that
//!   runs it gets a panic naming the type and the place the cell or map was
//!   created. Keyed *locks* are not checked: their guards are `Send`, and a
//!   wait for a key whose guard moved to another thread ends. The check is
//!   per thread: a cycle through another thread (an
//!   initialiser that spawns a thread which calls `get_or_init` on the same
//!   cell, then joins it) or through another task is not detected and
//!   deadlocks, as it does with `OnceLock`.
//! - **Fast paths cost what the baseline costs.** Reading an initialised cell
//!   is one `Acquire` load and a branch, like `std::sync::OnceLock`. A
//!   `SingletonMap` hit hashes once, takes a shard read lock and clones an
//!   `Arc`, like `DashMap::get` plus an `Arc` clone.
//! - **Keyed entries live exactly as long as they are needed.** A
//!   [`KeyedLocks`] entry exists while somebody holds or waits for its key;
//!   the lookup-and-lock and the unlock-and-remove are each one step, so two
//!   parties never get two locks for one key.
//! - **Removal is ordered against initialisation.** `SingletonMap::remove`
//!   waits for an initialisation of its key in flight, so a shutdown cannot
//!   miss a value that is being created.
//!
//! # Model checking your own code: `--cfg toctou_loom`
//!
//! Every atomic, lock and park inside `toctou` comes from one internal sync
//! layer. Build with `RUSTFLAGS="--cfg toctou_loom"` and that layer maps to
//! [loom](https://docs.rs/loom), so a loom model of **your** code explores
//! the interleavings of **our** real protocol too. The cfg is namespaced: a
//! `--cfg loom` elsewhere in your tree does not switch `toctou`.
//!
//! A `static` [`Singleton`], [`Lazy`] or [`RegistryCell`] compiles under the
//! cfg too, and inside a model it is empty again at the start of every
//! execution, as a `loom::lazy_static!` is. As with `loom::lazy_static!`,
//! each access to a cell synchronises with the cell's first access in that
//! execution, so a race whose only witness is what the first user did before
//! that first access can go unseen; a cell created inside the model has the
//! same property. Add loom to your crate for that cfg, and declare the cfg
//! so that rustc does not warn about it:
//!
//! ```toml
//! [target.'cfg(toctou_loom)'.dev-dependencies]
//! loom = "0.7"
//!
//! [lints.rust]
//! unexpected_cfgs = { level = "warn", check-cfg = ['cfg(toctou_loom)'] }
//! ```
//!
//! and write the model so that it also runs as a plain test:
//!
//! ```
//! #[cfg(toctou_loom)]
//! use loom::{model, sync::Arc, thread};
//! #[cfg(not(toctou_loom))]
//! use std::{sync::Arc, thread};
//! #[cfg(not(toctou_loom))]
//! fn model(f: impl Fn()) {
//!     f()
//! }
//!
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use toctou::Singleton;
//!
//! // Your code: a registry that must be built once.
//! fn registry(cell: &Singleton<Vec<&'static str>>, builds: &AtomicUsize) -> usize {
//!     cell.get_or_init(|| {
//!         builds.fetch_add(1, Ordering::Relaxed);
//!         vec!["openai", "anthropic"]
//!     })
//!     .len()
//! }
//!
//! model(|| {
//!     let cell = Arc::new(Singleton::new());
//!     let builds = Arc::new(AtomicUsize::new(0));
//!     let other = {
//!         let (cell, builds) = (cell.clone(), builds.clone());
//!         thread::spawn(move || registry(&cell, &builds))
//!     };
//!     assert_eq!(registry(&cell, &builds), 2);
//!     assert_eq!(other.join().unwrap(), 2);
//!     assert_eq!(builds.load(Ordering::Relaxed), 1, "built exactly once");
//! });
//! ```
//!
//! Run it with `RUSTFLAGS="--cfg toctou_loom" cargo test --release`. The
//! repository's `loom-tests/downstream.rs` is this model, run by our CI, and
//! `loom-tests/downstream-crate/` is a crate whose library has `static`
//! cells, with loom models that race them.
//!
//! # Performance
//!
//! The fast paths do what the baselines' do: reading an initialised
//! [`Singleton`] is the load, compare and branch of `OnceLock::get`, and a
//! [`SingletonMap`] hit is the hash, shard read lock and `Arc` clone of a
//! dashmap hit. [`docs::performance`] explains each primitive's costs and
//! quotes the measured ratios; every number is in the repository's
//! [BENCHMARKS.md](https://github.com/toctou-rs/toctou/blob/main/BENCHMARKS.md).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod docs;
#[cfg(target_os = "linux")]
mod file;
mod hash;
mod keyed;
mod once;
mod reentry;
mod registry;
mod singleton;
mod singleton_map;
mod sync;
mod table;
mod wait;

/// The in-process layer of [`FileLocks`], exposed only under
/// `--cfg toctou_loom` for the same models. Not a stable API.
#[cfg(all(toctou_loom, target_os = "linux"))]
#[doc(hidden)]
pub use file::layer as __file_layer;
/// The on-disk protocol of [`FileLocks`], exposed only under
/// `--cfg toctou_loom` for the loom models in `loom-tests/file_locks.rs`,
/// which run it over a simulated file system. Not a stable API.
#[cfg(all(toctou_loom, target_os = "linux"))]
#[doc(hidden)]
pub use file::protocol as __file_protocol;
#[cfg(target_os = "linux")]
pub use file::{FileGuard, FileLocks, FileLocksBuilder, OwnedFileGuard};
pub use hash::LazyRandomState;
pub use keyed::{
    KeyGuard, KeyReadGuard, KeyWriteGuard, KeyedLocks, KeyedRwLocks, LockStats, MultiKeyGuard,
    OwnedKeyGuard,
};
pub use registry::{RegistryCell, RegistryRef};
pub use singleton::{Lazy, Singleton};
pub use singleton_map::SingletonMap;
/// Under `--cfg toctou_loom`: the spin budget of keyed acquisitions in the
/// loom models run on this thread. Not a stable API.
#[cfg(toctou_loom)]
#[doc(hidden)]
pub use sync::loom_spin_rounds as __loom_spin_rounds;
/// Under `--cfg toctou_loom`: after how many parks a timed wait expires in
/// the loom models run on this thread. Not a stable API.
#[cfg(toctou_loom)]
#[doc(hidden)]
pub use sync::loom_timed_parks as __loom_timed_parks;

/// The README's examples, compiled and run as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
