//! Scenario 6, agents as processes (incident 002, Linux only): scenario 3's
//! agents, spawned as separate processes, claim tasks from a queue kept in
//! files and record their results in shared context files. Each agent
//! process runs two agent threads.
//!
//! - **naive**: the incident's `ContextManager` locks: a per-file dict of
//!   thread locks, here an in-process `KeyedLocks`/`KeyedRwLocks`. They
//!   exclude the threads of one process and nobody else: agent processes
//!   claim the same task, lose each other's lines and read half-written
//!   files.
//! - **toctou**: `FileLocks` on one directory shared by all the processes:
//!   `try_lock("task-N")` around the claim, `lock("context-N")` around a
//!   read-modify-write, `lock_shared` around a read. The lock directory is
//!   empty at the end.
//!
//! Claiming a task creates `tasks/N` and appends the agent's name to it, so
//! a task claimed twice holds two lines. The files live in a fresh temporary
//! directory, removed at the end.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;

use toctou::{FileLocks, KeyedLocks, KeyedRwLocks};

use crate::procs::{self, Children, TempDir};
use crate::task_queue::{FILES, TASKS_PER_AGENT, WINDOW, read_lines, write_file};
use crate::{Metric, Round};

/// Agent threads per agent process.
const THREADS: usize = 2;

/// Any lock guard: dropping it unlocks.
trait Guard {}
impl<T> Guard for T {}
type Held<'a> = Box<dyn Guard + 'a>;

/// The locks an agent process takes. One value per process, so the sizes of
/// its variants (which differ between builds) do not matter.
#[allow(clippy::large_enum_variant)]
enum Locks {
    /// The incident's per-process dicts of thread locks.
    PerProcess {
        tasks: KeyedLocks<usize>,
        files: KeyedRwLocks<usize>,
    },
    /// One lock directory for every process.
    Files(FileLocks),
}

impl Locks {
    /// Starts claiming `task`; `None` if somebody is claiming it now.
    fn try_claim(&self, task: usize) -> io::Result<Option<Held<'_>>> {
        Ok(match self {
            Locks::PerProcess { tasks, .. } => tasks.try_lock(&task).map(|g| Box::new(g) as Held),
            Locks::Files(locks) => locks
                .try_lock(&format!("task-{task}"))?
                .map(|g| Box::new(g) as Held),
        })
    }

    fn write(&self, file: usize) -> io::Result<Held<'_>> {
        Ok(match self {
            Locks::PerProcess { files, .. } => Box::new(files.write(&file)),
            Locks::Files(locks) => Box::new(locks.lock(&format!("context-{file}"))?),
        })
    }

    fn read(&self, file: usize) -> io::Result<Held<'_>> {
        Ok(match self {
            Locks::PerProcess { files, .. } => Box::new(files.read(&file)),
            Locks::Files(locks) => Box::new(locks.lock_shared(&format!("context-{file}"))?),
        })
    }
}

struct Workspace {
    tasks: usize,
    dir: PathBuf,
}

impl Workspace {
    fn claim_file(&self, task: usize) -> PathBuf {
        self.dir.join("tasks").join(task.to_string())
    }

    fn context_file(&self, file: usize) -> PathBuf {
        self.dir.join(format!("context-{file}.md"))
    }

    fn is_pending(&self, task: usize) -> bool {
        !self.claim_file(task).exists()
    }

    /// `UPDATE tasks SET assigned_to = agent`, after a round trip.
    fn claim(&self, task: usize, agent: usize) -> io::Result<()> {
        thread::sleep(WINDOW);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.claim_file(task))?;
        file.write_all(format!("agent {agent}\n").as_bytes())
    }
}

/// One agent thread: (results written, torn reads).
fn agent(ws: &Workspace, locks: &Locks, agent: usize) -> io::Result<(u64, u64)> {
    let (mut writes, mut torn) = (0, 0);
    loop {
        let mut busy = false;
        let mut claimed = None;
        for task in 0..ws.tasks {
            if !ws.is_pending(task) {
                continue; // SELECT id FROM tasks WHERE status = 'pending'
            }
            let Some(_claiming) = locks.try_claim(task)? else {
                busy = true; // another agent is claiming it now
                continue;
            };
            if ws.is_pending(task) {
                ws.claim(task, agent)?;
                claimed = Some(task);
                break;
            }
        }
        let Some(task) = claimed else {
            if busy {
                thread::yield_now();
                continue;
            }
            return Ok((writes, torn));
        };
        // Record the result: read the file, then write it back.
        let file = task % FILES;
        let writing = locks.write(file)?;
        let path = ws.context_file(file);
        let mut lines = read_lines(&path).unwrap_or_default();
        lines.push(format!("task {task}: agent {agent}"));
        thread::sleep(WINDOW / 3);
        write_file(&path, &lines);
        writes += 1;
        drop(writing);
        // Pick up another file's context.
        let file = (task + 1) % FILES;
        let _reading = locks.read(file)?;
        if read_lines(&ws.context_file(file)).is_none() {
            torn += 1;
        }
    }
}

/// The agent process: `THREADS` agents, then `writes torn` on stdout.
pub fn child() -> io::Result<()> {
    let dir = PathBuf::from(procs::var("TOCTOU_RACE_DIR")?);
    let first = procs::number("TOCTOU_RACE_AGENT")?;
    let ws = Workspace {
        tasks: procs::number("TOCTOU_RACE_TASKS")?,
        dir: dir.clone(),
    };
    let locks = match procs::var("TOCTOU_RACE_VARIANT")?.as_str() {
        "toctou" => Locks::Files(FileLocks::open(lock_dir(&dir))?),
        _ => Locks::PerProcess {
            tasks: KeyedLocks::new(),
            files: KeyedRwLocks::new(),
        },
    };
    if !procs::ready_then_wait()? {
        return Ok(());
    }
    let results = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (ws, locks) = (&ws, &locks);
                s.spawn(move || agent(ws, locks, first + t))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<io::Result<Vec<_>>>()
    })?;
    let writes: u64 = results.iter().map(|r| r.0).sum();
    let torn: u64 = results.iter().map(|r| r.1).sum();
    procs::say(&format!("{writes} {torn}"))
}

/// Runs `processes` agent processes released together over a fresh
/// workspace; returns the metrics.
fn run(processes: usize, variant: &str) -> Vec<Metric> {
    let tmp = TempDir::new(&format!("agents-{variant}"));
    let dir = tmp.path();
    fs::create_dir(dir.join("tasks")).expect("create the task queue");
    for file in 0..FILES {
        write_file(&dir.join(format!("context-{file}.md")), &[]);
    }
    let tasks = processes * THREADS * TASKS_PER_AGENT;
    let mut children = Children::default();
    for p in 0..processes {
        children.spawn(
            "agent",
            &[
                ("TOCTOU_RACE_DIR", dir.display().to_string()),
                ("TOCTOU_RACE_VARIANT", variant.to_owned()),
                ("TOCTOU_RACE_TASKS", tasks.to_string()),
                ("TOCTOU_RACE_AGENT", (p * THREADS).to_string()),
            ],
        );
    }
    children.tell_all("go");
    let (mut writes, mut torn) = (0, 0);
    for line in children.lines() {
        let n = procs::numbers(&line);
        writes += n[0];
        torn += n[1];
    }
    children.finish();

    let ws = Workspace {
        tasks,
        dir: dir.to_owned(),
    };
    let (mut duplicates, mut unclaimed) = (0, 0);
    for task in 0..tasks {
        match fs::read_to_string(ws.claim_file(task)) {
            Ok(claims) => duplicates += claims.lines().count().saturating_sub(1) as u64,
            Err(_) => unclaimed += 1,
        }
    }
    let contents: Vec<Option<Vec<String>>> = (0..FILES)
        .map(|f| read_lines(&ws.context_file(f)))
        .collect();
    let corrupt = contents.iter().filter(|c| c.is_none()).count() as u64;
    let kept: usize = contents.iter().flatten().map(Vec::len).sum();
    let lost = writes.saturating_sub(kept as u64);
    let mut metrics = vec![
        Metric::expect("duplicate claims", duplicates, 0),
        Metric::expect("unclaimed", unclaimed, 0),
        Metric::expect("lost updates", lost, 0),
        Metric::expect("torn reads", torn, 0),
        Metric::expect("corrupt files at the end", corrupt, 0),
    ];
    if variant == "toctou" {
        let left = procs::entries(&lock_dir(dir));
        metrics.push(Metric::expect("lock files left", left, 0));
    }
    metrics
}

/// The `FileLocks` directory inside a round's directory.
fn lock_dir(dir: &Path) -> PathBuf {
    dir.join("locks")
}

pub fn round(processes: usize) -> Round {
    Round {
        naive: run(processes, "naive"),
        toctou: run(processes, "toctou"),
        ..Round::default()
    }
}
