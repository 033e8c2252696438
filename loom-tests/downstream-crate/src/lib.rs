//! A downstream crate's library, written as the README's patterns write it:
//! its global cells are plain `static`s. The same code compiles in a normal
//! build and under `RUSTFLAGS="--cfg toctou_loom"`; in a loom model each
//! execution starts with every one of these cells empty, as it would with
//! `loom::lazy_static!` (see `tests/loom.rs`).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use toctou::{KeyedLocks, Lazy, RegistryCell, Singleton, SingletonMap};

/// Process-wide, deliberately a plain `std` atomic in every build: a serial
/// number is never reused, so equal serials mean "the same build".
static SERIALS: AtomicU64 = AtomicU64::new(1);

std::thread_local! {
    /// How many builds ran on this OS thread. A test hook: under loom a model
    /// runs all of its loom threads on one OS thread, so this counts the
    /// model's builds, unaffected by other tests' models running in parallel.
    static BUILDS: Cell<u64> = const { Cell::new(0) };
}

/// A new serial number, counted as one build.
fn build() -> u64 {
    BUILDS.with(|builds| builds.set(builds.get() + 1));
    // Relaxed: only uniqueness matters.
    SERIALS.fetch_add(1, Ordering::Relaxed)
}

/// The builds that ran on this OS thread so far.
pub fn builds_on_this_thread() -> u64 {
    BUILDS.with(Cell::get)
}

/// The application's configuration, loaded once.
pub struct Config {
    /// Which build this is.
    pub serial: u64,
}

static CONFIG: Singleton<Config> = Singleton::new();

/// The configuration, loaded by the first caller.
pub fn config() -> &'static Config {
    CONFIG.get_or_init(|| Config { serial: build() })
}

/// A table built on first access.
pub struct Ports {
    /// Which build this is.
    pub serial: u64,
}

static PORTS: Lazy<Ports> = Lazy::new(|| Ports { serial: build() });

/// The port table, built by the first caller.
pub fn ports() -> &'static Ports {
    &PORTS
}

/// The settings a registry is built from.
#[derive(Default, PartialEq)]
pub struct Settings {
    /// Where the providers live.
    pub region: &'static str,
}

/// A provider registry, rebuilt when the settings change.
pub struct Registry {
    /// Which build this is.
    pub serial: u64,
    /// The region it was built for.
    pub region: &'static str,
}

static REGISTRY: RegistryCell<Registry, Settings> = RegistryCell::new(|settings| Registry {
    serial: build(),
    region: settings.region,
});

/// The current registry's serial and region, building the first one from
/// the default settings.
pub fn registry() -> (u64, &'static str) {
    let registry = REGISTRY.get();
    (registry.serial, registry.region)
}

/// Switches the registry to `region`, rebuilding it only if that changes
/// the settings. Returns the serial of the registry now published.
pub fn switch_region(region: &'static str) -> u64 {
    REGISTRY.reinit_if_changed(Settings { region }).serial
}

/// One model server per model name, started once.
pub struct Server {
    /// Which start this is.
    pub serial: u64,
}

static SERVERS: SingletonMap<String, Server> = SingletonMap::new();

/// The server for `model`, started by the first caller.
pub fn server(model: &'static str) -> u64 {
    SERVERS
        .get_or_init(model, |_| Server { serial: build() })
        .serial
}

static WORKFLOWS: KeyedLocks<String> = KeyedLocks::new();

/// Runs `step` while holding the lock of `workflow`.
pub fn with_workflow<R>(workflow: &'static str, step: impl FnOnce() -> R) -> R {
    let _guard = WORKFLOWS.lock(workflow);
    step()
}

/// Whether no workflow lock has an entry (nobody holds or waits for one).
pub fn no_workflow_entries() -> bool {
    WORKFLOWS.is_empty()
}

/// Whether no global cell has been touched yet (in a loom model: in this
/// execution).
pub fn untouched() -> bool {
    CONFIG.get().is_none()
        && Lazy::get(&PORTS).is_none()
        && REGISTRY.generation() == 0
        && SERVERS.is_empty()
        && WORKFLOWS.is_empty()
}
