//! The model server incident: a model-server manager whose `ensure_server_running(model)` two
//! chats called at once, starting two servers on one port.
//!
//! A "model server" here is real: a `TcpListener` on the model's configured
//! port on 127.0.0.1, with a thread that answers one line per connection.
//! Starting one takes `--start-ms` (loading the weights).
//!
//! Three managers run the same workload:
//!
//! - **naive**: the incident's code before its fix: check the map under a lock, unlock,
//!   start, insert. Concurrent `ensure`s all start a server, and all but one
//!   fail with "address in use": the incident's port conflicts.
//! - **global lock**: the incident's fix, one `Mutex` held around every start.
//!   Correct, but unrelated models now start one after the other.
//! - **toctou::SingletonMap**: one start per model, different models in
//!   parallel, and `shutdown` (remove, stop, join) cannot race a start.
//!
//! Scenarios: `--threads` chats ensure `phi-4` at once; `phi-4` and
//! `nemotron` are ensured at the same moment; a shutdown races a start.
//! After each, the manager shuts down and the server threads are counted.
//!
//! ```text
//! cargo run --release --example server_manager [-- --threads N --start-ms MS]
//! ```
//!
//! Exits non-zero if the `toctou` manager ever shows a symptom.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use toctou::SingletonMap;

/// Server threads alive right now, across all managers.
static LIVE_SERVER_THREADS: AtomicUsize = AtomicUsize::new(0);

/// A running model server.
struct ModelServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ModelServer {
    /// Loads the model (sleeps `start`), binds its port and starts answering.
    fn start(model: &str, port: u16, start: Duration) -> io::Result<ModelServer> {
        thread::sleep(start);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        let stop = Arc::new(AtomicBool::new(false));
        LIVE_SERVER_THREADS.fetch_add(1, SeqCst);
        let thread = thread::spawn({
            let (stop, model) = (stop.clone(), model.to_owned());
            move || {
                for conn in listener.incoming() {
                    if stop.load(SeqCst) {
                        break;
                    }
                    if let Ok(mut conn) = conn {
                        let _ = writeln!(conn, "{model} on port {port}");
                    }
                }
                LIVE_SERVER_THREADS.fetch_sub(1, SeqCst);
            }
        });
        Ok(ModelServer {
            port,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks the server for its line, as a chat would.
    fn ask(&self) -> io::Result<String> {
        let mut line = String::new();
        BufReader::new(TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))?)
            .read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    }

    /// Stops the server and joins its thread.
    fn stop(&self) {
        self.stop.store(true, SeqCst);
        // Wake the blocking `accept` so that the thread sees the flag.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(thread) = self.thread.lock().unwrap().take() {
            thread.join().unwrap();
        }
    }
}

/// A free port on 127.0.0.1 for each model: its "configured" port.
fn configured_ports(models: &[&str]) -> HashMap<String, u16> {
    let listeners: Vec<_> = models
        .iter()
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
        .collect();
    models
        .iter()
        .zip(&listeners)
        .map(|(m, l)| (m.to_string(), l.local_addr().unwrap().port()))
        .collect()
}

/// What one manager did.
#[derive(Default)]
struct Outcome {
    starts: AtomicUsize,
    port_conflicts: AtomicUsize,
}

trait Manager: Sync {
    fn new(ports: HashMap<String, u16>, start: Duration) -> Self;
    fn outcome(&self) -> &Outcome;
    /// Returns the running server for `model`, starting it if needed.
    fn ensure(&self, model: &str) -> io::Result<Arc<ModelServer>>;
    /// Stops and forgets every server.
    fn shutdown_all(&self);
}

/// Starts a server, counting the attempt and any port conflict.
fn counted_start(
    outcome: &Outcome,
    model: &str,
    port: u16,
    start: Duration,
) -> io::Result<ModelServer> {
    outcome.starts.fetch_add(1, SeqCst);
    ModelServer::start(model, port, start).inspect_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            outcome.port_conflicts.fetch_add(1, SeqCst);
        }
    })
}

/// The incident's managers: a map of servers behind one mutex. With
/// `HOLD_WHILE_STARTING = false` it is the incident's code before its fix (check,
/// unlock, start, insert); with `true`, the incident's fix (one lock held around
/// every check and start).
struct Locked<const HOLD_WHILE_STARTING: bool> {
    ports: HashMap<String, u16>,
    start: Duration,
    servers: Mutex<HashMap<String, Arc<ModelServer>>>,
    outcome: Outcome,
}

type Naive = Locked<false>;
type GlobalLock = Locked<true>;

impl<const HOLD_WHILE_STARTING: bool> Manager for Locked<HOLD_WHILE_STARTING> {
    fn new(ports: HashMap<String, u16>, start: Duration) -> Self {
        Locked {
            ports,
            start,
            servers: Mutex::default(),
            outcome: Outcome::default(),
        }
    }
    fn outcome(&self) -> &Outcome {
        &self.outcome
    }
    fn ensure(&self, model: &str) -> io::Result<Arc<ModelServer>> {
        let servers = self.servers.lock().unwrap();
        if let Some(server) = servers.get(model) {
            return Ok(server.clone());
        }
        // The incident's bug: time of check above, time of use below, and
        // another chat is between them too.
        let mut held = HOLD_WHILE_STARTING.then_some(servers);
        let server = Arc::new(counted_start(
            &self.outcome,
            model,
            self.ports[model],
            self.start,
        )?);
        let mut servers = held.take().unwrap_or_else(|| self.servers.lock().unwrap());
        servers.insert(model.to_owned(), server.clone());
        Ok(server)
    }
    fn shutdown_all(&self) {
        let servers: Vec<_> = self.servers.lock().unwrap().drain().collect();
        servers.iter().for_each(|(_, s)| s.stop());
    }
}

/// With `toctou::SingletonMap`: one start per model, models in parallel.
struct Toctou {
    ports: HashMap<String, u16>,
    start: Duration,
    servers: SingletonMap<String, ModelServer>,
    outcome: Outcome,
}

impl Toctou {
    /// Stops one model's server. `remove` waits for a start in flight, so
    /// this cannot miss a server that is starting.
    fn shutdown(&self, model: &str) {
        if let Some(server) = self.servers.remove(model) {
            server.stop();
        }
    }
}

impl Manager for Toctou {
    fn new(ports: HashMap<String, u16>, start: Duration) -> Self {
        Toctou {
            ports,
            start,
            servers: SingletonMap::new(),
            outcome: Outcome::default(),
        }
    }
    fn outcome(&self) -> &Outcome {
        &self.outcome
    }
    fn ensure(&self, model: &str) -> io::Result<Arc<ModelServer>> {
        self.servers.get_or_try_init(model, |m| {
            counted_start(&self.outcome, m, self.ports[m], self.start)
        })
    }
    fn shutdown_all(&self) {
        for model in self.ports.keys() {
            self.shutdown(model);
        }
    }
}

/// `threads` chats call `ensure("phi-4")` at once; then a chat asks the
/// server. Returns (distinct ports seen by the chats, failed ensures).
fn same_model<M: Manager>(manager: &M, threads: usize) -> (usize, usize) {
    let barrier = Barrier::new(threads);
    let results: Vec<io::Result<u16>> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let server = manager.ensure("phi-4")?;
                    server.ask()?;
                    Ok(server.port)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ports: Vec<u16> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    (ports.len(), results.iter().filter(|r| r.is_err()).count())
}

/// `phi-4` and `nemotron` are ensured at the same moment. Returns the wall
/// time until both answer.
fn two_models<M: Manager>(manager: &M) -> Duration {
    let barrier = Barrier::new(2);
    let start = Instant::now();
    thread::scope(|s| {
        for model in ["phi-4", "nemotron"] {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                let server = manager
                    .ensure(model)
                    .expect("one chat per model: no conflict");
                assert!(server.ask().unwrap().starts_with(model));
            });
        }
    });
    start.elapsed()
}

/// A chat ensures `phi-4` while, a quarter of the way into the start, the
/// manager shuts everything down. Returns the servers still running once both
/// have returned: a server the shutdown missed.
fn start_vs_shutdown<M: Manager>(manager: &M, start: Duration) -> usize {
    let before = LIVE_SERVER_THREADS.load(SeqCst);
    thread::scope(|s| {
        s.spawn(|| manager.ensure("phi-4"));
        thread::sleep(start / 4);
        manager.shutdown_all();
    });
    let missed = LIVE_SERVER_THREADS.load(SeqCst) - before;
    manager.shutdown_all();
    missed
}

/// Runs the scenarios on a fresh manager of type `M` and prints its row.
/// Returns whether the row is clean (the toctou rows must be).
fn run<M: Manager>(name: &str, threads: usize, start: Duration) -> bool {
    let models = ["phi-4", "nemotron"];
    let manager = M::new(configured_ports(&models), start);
    let (ports, failed) = same_model(&manager, threads);
    let starts = manager.outcome().starts.load(SeqCst);
    let conflicts = manager.outcome().port_conflicts.load(SeqCst);
    manager.shutdown_all();

    let manager = M::new(configured_ports(&models), start);
    let both = two_models(&manager);
    manager.shutdown_all();

    let manager = M::new(configured_ports(&models), start);
    let missed = start_vs_shutdown(&manager, start);
    let left = LIVE_SERVER_THREADS.load(SeqCst);

    println!(
        "{name:<22} {threads:>6} {starts:>13} {conflicts:>13} {failed:>13} {ports:>11} {:>14.0?} {missed:>17} {left:>13}",
        both
    );
    starts == 1 && conflicts == 0 && failed == 0 && ports == 1 && missed == 0 && left == 0
}

fn usage() -> ! {
    eprintln!(
        "usage: server_manager [--threads N] [--start-ms MS]\n\
         \n\
         N chats ensure the same model at once (default 10); each server start\n\
         takes MS milliseconds (default 200). Exits 1 if the toctou manager\n\
         shows a symptom."
    );
    std::process::exit(2)
}

fn main() -> ExitCode {
    let (mut threads, mut start_ms) = (10usize, 200u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage())
        };
        match arg.as_str() {
            "--threads" => threads = value() as usize,
            "--start-ms" => start_ms = value(),
            _ => usage(),
        }
    }
    if threads == 0 {
        usage();
    }
    let start = Duration::from_millis(start_ms);

    println!(
        "{:<22} {:>6} {:>13} {:>13} {:>13} {:>11} {:>14} {:>17} {:>13}",
        "manager",
        "chats",
        "phi-4 starts",
        "port clashes",
        "failed chats",
        "ports seen",
        "2 models wall",
        "missed shutdown",
        "threads left"
    );
    run::<Naive>("naive check-then-start", threads, start);
    run::<GlobalLock>("global lock (the incident's fix)", threads, start);
    let clean = run::<Toctou>("toctou::SingletonMap", threads, start);
    println!(
        "\none start takes {start_ms} ms. 'missed shutdown': servers still running after a shutdown\n\
         that raced a start. The global lock starts two models one after the other; SingletonMap\n\
         starts them in parallel, and its shutdown waits for a start in flight."
    );
    if clean {
        ExitCode::SUCCESS
    } else {
        eprintln!("toctou::SingletonMap showed a symptom");
        ExitCode::FAILURE
    }
}
