//! Scenario 4, the provider registry: `get_provider_registry(settings=None)`, which builds the registry
//! when there is none, and rebuilds it whenever settings are passed.
//!
//! Half the workers call it with no settings, as most of the application
//! does; the other half pass the settings they loaded, which equal the
//! defaults. The naive version is the incident's `if _registry is None or
//! settings is not None: _registry = ProviderRegistry(settings)`: every
//! worker that passes the check builds its own registry, and the workers end
//! up holding different instances. With `toctou::RegistryCell`, `get` builds
//! the first instance once, and `reinit_if_changed` with equal settings does
//! not rebuild: one build, one instance.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use toctou::RegistryCell;

use crate::{Metric, Round, released_together};

#[derive(Clone, Debug, PartialEq)]
struct Settings {
    providers: Vec<&'static str>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            providers: vec!["openai", "anthropic", "local"],
        }
    }
}

struct ProviderRegistry {
    _providers: Vec<&'static str>,
}

/// Builds a registry the slow way the incident's constructor did, and counts it.
fn build(settings: &Settings, builds: &AtomicU64) -> ProviderRegistry {
    builds.fetch_add(1, SeqCst);
    thread::sleep(Duration::from_millis(10));
    ProviderRegistry {
        _providers: settings.providers.clone(),
    }
}

/// Worker `i`'s settings argument: none for even workers, the loaded
/// settings (equal to the defaults) for odd ones.
fn settings_of(worker: usize) -> Option<Settings> {
    (worker % 2 == 1).then(Settings::default)
}

fn metrics(builds: &AtomicU64, seen: &[Arc<ProviderRegistry>]) -> Vec<Metric> {
    let distinct = seen.iter().map(Arc::as_ptr).collect::<HashSet<_>>().len();
    vec![
        Metric::expect("builds", builds.load(SeqCst), 1),
        Metric::expect("unique instances", distinct as u64, 1),
    ]
}

pub fn round(workers: usize) -> Round {
    // Naive: the incident's check, then build and store. Every returned `Arc`
    // stays alive until the count, so distinct instances have distinct
    // addresses.
    let builds = AtomicU64::new(0);
    let global: Mutex<Option<Arc<ProviderRegistry>>> = Mutex::new(None);
    let seen = released_together(workers, |worker| {
        let settings = settings_of(worker);
        let current = global.lock().unwrap().clone();
        match current {
            Some(registry) if settings.is_none() => registry, // time of check
            _ => {
                let settings = settings.unwrap_or_default();
                let built = Arc::new(build(&settings, &builds));
                *global.lock().unwrap() = Some(built.clone()); // time of use
                built
            }
        }
    });
    let naive = metrics(&builds, &seen);

    // toctou: `build` is a plain `fn`, so the count lives in a static that
    // only this scenario's cell uses; it is reset for each round.
    static BUILDS: AtomicU64 = AtomicU64::new(0);
    BUILDS.store(0, SeqCst);
    let cell: RegistryCell<ProviderRegistry, Settings> = RegistryCell::new(|s| build(s, &BUILDS));
    let seen = released_together(workers, |worker| match settings_of(worker) {
        None => cell.get_arc(),
        Some(settings) => cell.reinit_if_changed(settings),
    });
    let mut toctou = metrics(&BUILDS, &seen);
    toctou.push(Metric::expect("generation", cell.generation(), 1));
    Round {
        naive,
        toctou,
        ..Round::default()
    }
}
