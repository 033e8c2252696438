//! Scenario 7, manager processes (incident 001, Linux only): scenario 2's
//! model server manager, run as several processes on one machine (chat
//! windows, CLIs, workers), each of which makes sure that the model's
//! server is running: "is something listening on the model's port? no:
//! start the server". The incident's `threading.RLock` cannot reach across
//! processes.
//!
//! - **naive**: the check and the start with nothing around them. Every
//!   manager that checks before the first server is up starts its own; all
//!   but one fail to bind the port.
//! - **toctou**: the same check and start under `FileLocks::lock("phi-4")`.
//!   One server starts; the other managers find it listening.
//!
//! Then the server is killed with `SIGKILL` and every manager ensures the
//! model again: with the lock, exactly one new server starts. The check is
//! the port itself, and a killed process's lock is released by the kernel,
//! so nothing stale (no pidfile, no lock file) is left to clean up first.
//!
//! A server is a child process of its manager (this binary again) that
//! loads for 50 ms, binds a TCP listener on 127.0.0.1 on the port the
//! report reserved, says `up`, and runs until its manager's pipe closes. A
//! clash is the operating system's `AddrInUse`. Managers kill and reap
//! their servers when the report closes their stdin.

use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use toctou::FileLocks;

use crate::procs::{self, Children, TempDir};
use crate::{Metric, Round};

/// How long a model server takes to load before it binds its port.
const START: Duration = Duration::from_millis(50);
const MODEL: &str = "phi-4";

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Is a server listening on `port`?
fn running(port: u16) -> bool {
    TcpStream::connect_timeout(&addr(port), Duration::from_secs(1)).is_ok()
}

/// The model server process: load, bind, say `up` (or `clash`), then run
/// until stdin closes.
pub fn server_child() -> io::Result<()> {
    let port: u16 = procs::var("TOCTOU_RACE_PORT")?
        .parse()
        .map_err(io::Error::other)?;
    thread::sleep(START); // loading the model
    match TcpListener::bind(addr(port)) {
        Ok(_listener) => {
            procs::say("up")?;
            // Serve until the manager goes away.
            let mut sink = String::new();
            while io::stdin().lock().read_line(&mut sink)? > 0 {}
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => procs::say("clash"),
        Err(e) => Err(e),
    }
}

/// Ensures the model's server runs: `reused`, `started PID` or `clash`.
fn ensure(port: u16, locks: Option<&FileLocks>, servers: &mut Vec<Child>) -> io::Result<String> {
    let _guard = locks.map(|l| l.lock(MODEL)).transpose()?;
    if running(port) {
        return Ok("reused".to_owned()); // time of check
    }
    // Time of use: start the server and wait until it bound the port.
    let mut server = Command::new(std::env::current_exe()?)
        .env(procs::ROLE, "server")
        .env("TOCTOU_RACE_PORT", port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line)?;
    if line.trim_end() == "up" {
        let pid = server.id();
        servers.push(server);
        Ok(format!("started {pid}"))
    } else {
        let _ = server.kill();
        server.wait()?;
        Ok("clash".to_owned())
    }
}

/// The manager process: one `ensure` per line on stdin, its result on
/// stdout; at end-of-file it kills and reaps its servers.
pub fn manager_child() -> io::Result<()> {
    let port: u16 = procs::var("TOCTOU_RACE_PORT")?
        .parse()
        .map_err(io::Error::other)?;
    let locks = match procs::var("TOCTOU_RACE_VARIANT")?.as_str() {
        "toctou" => Some(FileLocks::open(procs::var("TOCTOU_RACE_DIR")?)?),
        _ => None,
    };
    let mut servers = Vec::new();
    let result = (|| {
        procs::say("ready")?;
        let mut line = String::new();
        while io::stdin().lock().read_line(&mut line)? > 0 {
            line.clear();
            let outcome = ensure(port, locks.as_ref(), &mut servers)?;
            procs::say(&outcome)?;
        }
        Ok(())
    })();
    for mut server in servers {
        let _ = server.kill();
        let _ = server.wait();
    }
    result
}

/// What the managers' `ensure`s did: (servers started, port clashes, pids
/// of the servers up).
fn tally(outcomes: &[String]) -> (u64, u64, Vec<i32>) {
    let (mut started, mut clashes, mut pids) = (0, 0, Vec::new());
    for outcome in outcomes {
        if let Some(pid) = outcome.strip_prefix("started ") {
            started += 1;
            pids.push(pid.parse().expect("a pid"));
        } else if outcome == "clash" {
            started += 1;
            clashes += 1;
        }
    }
    (started, clashes, pids)
}

fn run(managers: usize, variant: &str) -> Vec<Metric> {
    let tmp = TempDir::new(&format!("managers-{variant}"));
    let lock_dir = tmp.path().join("locks");
    // A free port for the model, bound by its servers only.
    let port = TcpListener::bind(addr(0))
        .and_then(|probe| probe.local_addr())
        .expect("bind a free port")
        .port();
    let mut children = Children::default();
    for _ in 0..managers {
        children.spawn(
            "manager",
            &[
                ("TOCTOU_RACE_PORT", port.to_string()),
                ("TOCTOU_RACE_VARIANT", variant.to_owned()),
                ("TOCTOU_RACE_DIR", lock_dir.display().to_string()),
            ],
        );
    }
    children.tell_all("ensure");
    let (started, clashes, pids) = tally(&children.lines());

    // Kill the server(s) with SIGKILL and wait until the port is free.
    for pid in pids {
        // SAFETY: kill(2) touches no memory. `pid` is a server that a
        // manager started, still its unreaped child (managers reap theirs
        // only when they exit), so the pid has not been reused.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while running(port) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    children.tell_all("ensure");
    let (restarted, more_clashes, _) = tally(&children.lines());
    children.finish();

    let mut metrics = vec![
        Metric::expect("servers started", started, 1),
        Metric::expect("port clashes", clashes + more_clashes, 0),
        Metric::expect("started after SIGKILL", restarted, 1),
    ];
    if variant == "toctou" {
        let left = procs::entries(&lock_dir);
        metrics.push(Metric::expect("lock files left", left, 0));
    }
    metrics
}

pub fn round(managers: usize) -> Round {
    Round {
        naive: run(managers, "naive"),
        toctou: run(managers, "toctou"),
        ..Round::default()
    }
}
