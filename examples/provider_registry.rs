//! The provider registry incident: a global provider registry that `get_provider_registry()` built
//! 6 times under 10 workers and 47 times under 200.
//!
//! The naive version is the incident's `if _registry is None or settings is not
//! None: _registry = ProviderRegistry(settings)`, written in safe Rust: check
//! under a lock, build (slowly) outside it, store under the lock again.
//! `toctou::RegistryCell` builds once, and rebuilds only on an explicit
//! `reinit`, which readers do not wait for.
//!
//! ```text
//! cargo run --release --example provider_registry [-- --workers N]
//! ```
//!
//! Exits non-zero if the `RegistryCell` rows show a symptom.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use toctou::RegistryCell;

/// The incident's settings: which providers to load.
#[derive(Clone, Default, PartialEq)]
struct Settings {
    providers: Vec<&'static str>,
}

/// The incident's registry. Building one takes 10 ms (it reads configuration
/// and connects to the providers).
struct ProviderRegistry {
    providers: Vec<&'static str>,
    live: &'static AtomicUsize,
}

static NAIVE_LIVE: AtomicUsize = AtomicUsize::new(0);
static TOCTOU_LIVE: AtomicUsize = AtomicUsize::new(0);
static RACE_LIVE: AtomicUsize = AtomicUsize::new(0);
/// Set while the demo's rebuild runs.
static REBUILDING: AtomicBool = AtomicBool::new(false);

impl ProviderRegistry {
    fn new(settings: &Settings, live: &'static AtomicUsize, build_time: Duration) -> Self {
        thread::sleep(build_time);
        live.fetch_add(1, SeqCst);
        ProviderRegistry {
            providers: settings.providers.clone(),
            live,
        }
    }
}

impl Drop for ProviderRegistry {
    fn drop(&mut self) {
        self.live.fetch_sub(1, SeqCst);
    }
}

/// The incident's `get_provider_registry(settings=None)`.
struct Naive {
    registry: Mutex<Option<Arc<ProviderRegistry>>>,
    builds: AtomicUsize,
}

impl Naive {
    fn get(&self, settings: Option<&Settings>) -> Arc<ProviderRegistry> {
        let current = self.registry.lock().unwrap().clone();
        match current {
            Some(registry) if settings.is_none() => registry,
            // Time of check above, time of use below.
            _ => {
                self.builds.fetch_add(1, SeqCst);
                let default = Settings::default();
                let built = Arc::new(ProviderRegistry::new(
                    settings.unwrap_or(&default),
                    &NAIVE_LIVE,
                    Duration::from_millis(10),
                ));
                *self.registry.lock().unwrap() = Some(built.clone());
                built
            }
        }
    }
}

static REGISTRY: RegistryCell<ProviderRegistry, Settings> = RegistryCell::new(|settings| {
    // Slower when rebuilding with providers, to show readers not waiting.
    let build_time = if settings.providers.is_empty() {
        10
    } else {
        50
    };
    ProviderRegistry::new(settings, &TOCTOU_LIVE, Duration::from_millis(build_time))
});

/// `workers` threads, released together, each get the registry once.
/// Returns the number of distinct instances they saw.
fn race(workers: usize, get: &(dyn Fn() -> Arc<ProviderRegistry> + Sync)) -> usize {
    let barrier = Barrier::new(workers);
    let seen: HashSet<usize> = thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    Arc::as_ptr(&get()) as usize
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    seen.len()
}

fn usage() -> ! {
    eprintln!(
        "usage: provider_registry [--workers N]\n\
         \n\
         Runs the scenario with 10 and N workers (default 200), naive and with\n\
         RegistryCell, then a reinit under read load. Exits 1 if RegistryCell\n\
         shows a symptom."
    );
    std::process::exit(2)
}

fn main() -> ExitCode {
    let mut many = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--workers", Some(n)) if n > 0 => many = n,
            _ => usage(),
        }
    }
    let mut clean = true;

    println!(
        "{:<34} {:>8} {:>18}",
        "get_provider_registry()", "workers", "distinct instances"
    );
    for workers in [10, many] {
        let naive = Naive {
            registry: Mutex::new(None),
            builds: AtomicUsize::new(0),
        };
        let distinct = race(workers, &|| naive.get(None));
        println!(
            "{:<34} {workers:>8} {distinct:>18}",
            "naive (check, build, store)"
        );
    }
    for workers in [10, many] {
        // A fresh cell per row: a local one (the static is for the reinit demo).
        let cell: RegistryCell<ProviderRegistry, Settings> =
            RegistryCell::new(|s| ProviderRegistry::new(s, &RACE_LIVE, Duration::from_millis(10)));
        let distinct = race(workers, &|| cell.get_arc());
        println!(
            "{:<34} {workers:>8} {distinct:>18}",
            "toctou::RegistryCell::get"
        );
        clean &= distinct == 1;
    }

    // Reinit under read load: readers keep reading while a 50 ms rebuild
    // runs, and move from generation 1 to 2 without going back.
    println!();
    assert_eq!(REGISTRY.get().generation(), 1);
    let stop = Arc::new(AtomicBool::new(false));
    // Every reader has read generation 1 before the rebuild starts.
    let all_reading = Arc::new(Barrier::new(3));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, all_reading) = (stop.clone(), all_reading.clone());
            thread::spawn(move || {
                let mut seen = vec![REGISTRY.get().generation()];
                let (mut slowest, mut during) = (Duration::ZERO, 0u64);
                all_reading.wait();
                let deadline = Instant::now() + Duration::from_secs(10);
                // Until the rebuild is over and this reader has seen it.
                while !(stop.load(SeqCst) && seen.last() == Some(&2)) && Instant::now() < deadline {
                    let start = Instant::now();
                    let rebuilding = REBUILDING.load(SeqCst);
                    let registry = REGISTRY.get();
                    // A read that began and ended inside the rebuild: it did
                    // not wait for the build to finish.
                    if rebuilding && REBUILDING.load(SeqCst) {
                        during += 1;
                    }
                    slowest = slowest.max(start.elapsed());
                    if seen.last() != Some(&registry.generation()) {
                        seen.push(registry.generation());
                    }
                }
                (seen, slowest, during)
            })
        })
        .collect();
    all_reading.wait();
    let settings = Settings {
        providers: vec!["openai", "anthropic"],
    };
    let started = Instant::now();
    REBUILDING.store(true, SeqCst);
    let new = REGISTRY.reinit(settings);
    REBUILDING.store(false, SeqCst);
    let rebuild = started.elapsed();
    stop.store(true, SeqCst);
    for (i, reader) in readers.into_iter().enumerate() {
        let (seen, slowest, during) = reader.join().unwrap();
        let path = seen
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" -> ");
        println!(
            "reader {i}: generations {path}; {during} reads completed during the {rebuild:.0?} rebuild; slowest read {slowest:.1?}"
        );
        clean &= seen == [1, 2] && during > 0;
    }
    assert_eq!(new.providers, ["openai", "anthropic"]);
    // This thread's view moves to generation 2 too; the readers have exited.
    assert_eq!(REGISTRY.get().generation(), 2);
    drop(new);
    let live = TOCTOU_LIVE.load(SeqCst);
    println!("registries alive after the reinit: {live} (the old one was dropped)");
    clean &= live == 1;

    if clean {
        ExitCode::SUCCESS
    } else {
        eprintln!("toctou::RegistryCell showed a symptom");
        ExitCode::FAILURE
    }
}
