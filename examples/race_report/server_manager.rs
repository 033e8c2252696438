//! Scenario 2, the model server manager: chats that each make sure the model server for their model is
//! running, on the port configured for that model.
//!
//! - **naive**: "is it in the map? no: start it, then insert it". Every chat
//!   that checks before the first start finishes starts its own server; all
//!   but one fail to bind the port, and those chats fail.
//! - **global lock** (the incident's fix): the check and the start under one
//!   mutex. Correct, but two different models start one after the other.
//! - **toctou**: `SingletonMap::get_or_try_init`. One start per model, and
//!   different models start in parallel.
//!
//! The servers are real TCP listeners on 127.0.0.1, so a port conflict is the
//! operating system's `AddrInUse`, not a simulation.

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use toctou::SingletonMap;

use crate::{Metric, Round, released_together};

/// How long a model server takes to come up before it binds its port.
const START: Duration = Duration::from_millis(50);

/// A running model server: it holds its port.
struct Server {
    _listener: TcpListener,
}

/// Starts servers on the configured ports and counts what happened.
struct Launcher {
    ports: HashMap<&'static str, u16>,
    starts: AtomicU64,
    clashes: AtomicU64,
}

impl Launcher {
    /// A launcher with a free port reserved for each model.
    fn new(models: &[&'static str]) -> Self {
        // Bind all of them at once so that the ports are distinct, then let
        // go: the servers bind them again.
        let probes: Vec<TcpListener> = models
            .iter()
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
            .collect();
        let ports = models
            .iter()
            .zip(&probes)
            .map(|(model, probe)| (*model, probe.local_addr().unwrap().port()))
            .collect();
        Launcher {
            ports,
            starts: AtomicU64::new(0),
            clashes: AtomicU64::new(0),
        }
    }

    fn start(&self, model: &str) -> io::Result<Server> {
        self.starts.fetch_add(1, SeqCst);
        thread::sleep(START); // loading the model
        match TcpListener::bind(("127.0.0.1", self.ports[model])) {
            Ok(listener) => Ok(Server {
                _listener: listener,
            }),
            Err(e) => {
                if e.kind() == io::ErrorKind::AddrInUse {
                    self.clashes.fetch_add(1, SeqCst);
                }
                Err(e)
            }
        }
    }
}

trait Manager: Sync {
    fn ensure(&self, launcher: &Launcher, model: &str) -> io::Result<Arc<Server>>;
}

/// The incident's manager: check, then start and insert.
#[derive(Default)]
struct Naive(Mutex<HashMap<String, Arc<Server>>>);

impl Manager for Naive {
    fn ensure(&self, launcher: &Launcher, model: &str) -> io::Result<Arc<Server>> {
        if let Some(running) = self.0.lock().unwrap().get(model) {
            return Ok(running.clone()); // time of check
        }
        let server = Arc::new(launcher.start(model)?);
        self.0
            .lock()
            .unwrap()
            .insert(model.to_owned(), server.clone()); // time of use
        Ok(server)
    }
}

/// The incident's fix: one lock held across the check and the start.
#[derive(Default)]
struct GlobalLock(Mutex<HashMap<String, Arc<Server>>>);

impl Manager for GlobalLock {
    fn ensure(&self, launcher: &Launcher, model: &str) -> io::Result<Arc<Server>> {
        let mut servers = self.0.lock().unwrap();
        if let Some(running) = servers.get(model) {
            return Ok(running.clone());
        }
        let server = Arc::new(launcher.start(model)?);
        servers.insert(model.to_owned(), server.clone());
        Ok(server)
    }
}

/// toctou: one start per model, models in parallel.
#[derive(Default)]
struct Toctou(SingletonMap<String, Server>);

impl Manager for Toctou {
    fn ensure(&self, launcher: &Launcher, model: &str) -> io::Result<Arc<Server>> {
        self.0.get_or_try_init(model, |model| launcher.start(model))
    }
}

/// `chats` chats released together ensure `phi-4`: (starts, port clashes,
/// failed chats).
fn same_model(manager: &impl Manager, chats: usize) -> (u64, u64, u64) {
    let launcher = Launcher::new(&["phi-4"]);
    let failed = released_together(chats, |_| manager.ensure(&launcher, "phi-4").is_err())
        .into_iter()
        .filter(|&failed| failed)
        .count();
    (
        launcher.starts.load(SeqCst),
        launcher.clashes.load(SeqCst),
        failed as u64,
    )
}

/// Two chats for two different models at once: the wall time, in ms.
fn two_models(manager: &impl Manager) -> u64 {
    let models = ["phi-4", "llama-3"];
    let launcher = Launcher::new(&models);
    let started = Instant::now();
    let all_up = released_together(2, |i| manager.ensure(&launcher, models[i]).is_ok());
    assert!(
        all_up.iter().all(|&up| up),
        "two distinct models both start"
    );
    started.elapsed().as_millis() as u64
}

fn counts(starts: u64, clashes: u64, failed: u64) -> Vec<Metric> {
    vec![
        Metric::expect("servers started", starts, 1),
        Metric::expect("port clashes", clashes, 0),
        Metric::expect("failed chats", failed, 0),
    ]
}

pub fn round(chats: usize) -> Round {
    let (starts, clashes, failed) = same_model(&Naive::default(), chats);
    let mut naive = counts(starts, clashes, failed);
    naive.push(Metric::info(
        "2 models started in",
        two_models(&Naive::default()),
        "ms",
    ));

    let (starts, clashes, failed) = same_model(&Toctou::default(), chats);
    let mut toctou = counts(starts, clashes, failed);
    let parallel = two_models(&Toctou::default());
    let serial = two_models(&GlobalLock::default());
    // Two starts in parallel take one START, the global lock's two. A
    // toctou time near the global lock's means it serialised the models.
    toctou.push(Metric::check(
        "2 models started in",
        parallel,
        "ms",
        parallel * 4 < serial * 3,
    ));
    let reference = vec![Metric::info(
        "the incident's fix (one global lock) started 2 models in",
        serial,
        "ms",
    )];
    Round {
        naive,
        toctou,
        reference,
    }
}
