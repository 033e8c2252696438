//! Child processes for the cross-process scenarios (Linux only): the example
//! binary re-executed with `TOCTOU_RACE_ROLE` naming what the child plays.
//! `main` calls [`child_main`] before it parses any argument.
//!
//! Parent and child talk over the child's stdin and stdout, one line at a
//! time: the child prints `ready`, waits for a line (so that the parent can
//! release every child at once), works, and prints its results. A child
//! whose stdin reaches end-of-file exits: if the parent dies, its children
//! follow, and their own children (the model servers) follow them.
//! [`Children`] kills and reaps every child it started when dropped, also
//! when a scenario panics.

use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::{agent_processes, deletion_race, manager_processes};

/// The environment variable that names a child's role.
pub const ROLE: &str = "TOCTOU_RACE_ROLE";

/// If this process is a child, plays its role and returns its exit status.
pub fn child_main() -> Option<ExitCode> {
    let role = std::env::var(ROLE).ok()?;
    let result = match role.as_str() {
        "agent" => agent_processes::child(),
        "manager" => manager_processes::manager_child(),
        "server" => manager_processes::server_child(),
        "locker" => deletion_race::child(),
        other => Err(io::Error::other(format!("unknown role {other:?}"))),
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("race_report child ({role}): {e}");
            ExitCode::FAILURE
        }
    })
}

/// A child's environment variable, as a string.
pub fn var(name: &str) -> io::Result<String> {
    std::env::var(name).map_err(|e| io::Error::other(format!("{name}: {e}")))
}

/// A child's environment variable, as a number.
pub fn number(name: &str) -> io::Result<usize> {
    var(name)?
        .parse()
        .map_err(|e| io::Error::other(format!("{name}: {e}")))
}

/// The child side of the start signal: prints `ready`, then waits for the
/// parent's line. `false` if the parent closed stdin instead.
pub fn ready_then_wait() -> io::Result<bool> {
    say("ready")?;
    let mut line = String::new();
    Ok(io::stdin().lock().read_line(&mut line)? > 0)
}

/// Prints one line to the parent.
pub fn say(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// A fresh, empty directory for one round of one scenario, removed by
/// [`TempDir`]'s drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(scenario: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "toctou-race-report-{}-{scenario}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The entries of `dir` (0 if it does not exist).
pub fn entries(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.count() as u64)
}

struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// The child processes of one round, killed and reaped when dropped.
#[derive(Default)]
pub struct Children(Vec<Proc>);

impl Children {
    /// Starts this binary as a child playing `role`, with `env`, and waits
    /// for its `ready`.
    pub fn spawn(&mut self, role: &str, env: &[(&str, String)]) {
        let mut child = Command::new(std::env::current_exe().expect("the example's path"))
            .env(ROLE, role)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("re-execute the example as a child process");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        self.0.push(Proc {
            child,
            stdin,
            stdout,
        });
        let i = self.0.len() - 1;
        let ready = self.line(i);
        assert_eq!(ready, "ready", "child {role} did not start");
    }

    /// Sends `line` to every child, one right after the other.
    pub fn tell_all(&mut self, line: &str) {
        for proc in &mut self.0 {
            let stdin = proc.stdin.as_mut().expect("stdin still open");
            writeln!(stdin, "{line}")
                .and_then(|()| stdin.flush())
                .expect("tell a child");
        }
    }

    /// The next line child `i` prints. Panics if it exited instead.
    pub fn line(&mut self, i: usize) -> String {
        let mut line = String::new();
        let n = self.0[i]
            .stdout
            .read_line(&mut line)
            .expect("read a child's output");
        assert!(n > 0, "a child process exited early (see its error above)");
        line.trim_end().to_owned()
    }

    /// The next line of every child, in order.
    pub fn lines(&mut self) -> Vec<String> {
        (0..self.0.len()).map(|i| self.line(i)).collect()
    }

    /// Closes every child's stdin and waits for them all; panics if one
    /// failed.
    pub fn finish(mut self) {
        for proc in &mut self.0 {
            proc.stdin = None;
        }
        let mut failed = None;
        for proc in &mut self.0 {
            let status = proc.child.wait().expect("wait for a child");
            if !status.success() {
                failed = Some(status);
            }
        }
        self.0.clear();
        if let Some(status) = failed {
            panic!("a child process failed: {status}");
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        // Reached with children only on an error path: kill them.
        for proc in &mut self.0 {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }
}

/// Parses a line of space-separated numbers.
pub fn numbers(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .map(|n| n.parse().expect("a child's numbers"))
        .collect()
}
