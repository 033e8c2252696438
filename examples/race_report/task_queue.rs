//! Scenario 3, agents claiming tasks: agents claim tasks from a shared queue and record their results
//! in shared context files.
//!
//! - **naive**: claiming is "find a pending task", then "mark it claimed by
//!   me": two steps, like a `SELECT` followed by an `UPDATE`. Several agents
//!   find the same pending task and all claim it. Recording a result is "read
//!   the file, then write it back with one more line": concurrent writers lose
//!   each other's lines, and a reader can catch a file half rewritten.
//! - **toctou**: an agent claims a task under that task's key in a
//!   `KeyedLocks<usize>` (`try_lock`: a task another agent is claiming right
//!   now is skipped, not waited for), and reads and writes each file under its
//!   path's key in a `KeyedRwLocks<PathBuf>`. Both maps are empty afterwards.
//!
//! The files are real files in a fresh temporary directory, removed at the end.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::thread;
use std::time::Duration;

use toctou::{KeyedLocks, KeyedRwLocks};

use crate::{Metric, Round, released_together};

/// Tasks per agent.
pub const TASKS_PER_AGENT: usize = 4;
/// Context files the results go to.
pub const FILES: usize = 3;
/// The gap between the check and the act: a database round trip.
pub const WINDOW: Duration = Duration::from_micros(300);

/// The shared queue and files, with what the agents did to them.
struct Workspace {
    /// The agents that claimed each task.
    claimed_by: Vec<Mutex<Vec<usize>>>,
    files: Vec<PathBuf>,
    dir: PathBuf,
    /// Results written, one line each: what the files must hold at the end.
    writes: AtomicU64,
    torn_reads: AtomicU64,
}

impl Workspace {
    fn new(tasks: usize, variant: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "toctou-race-report-{}-{variant}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        fs::create_dir_all(&dir).expect("create a temporary directory");
        let files: Vec<PathBuf> = (0..FILES)
            .map(|i| dir.join(format!("context-{i}.md")))
            .collect();
        for file in &files {
            write_file(file, &[]);
        }
        Workspace {
            claimed_by: (0..tasks).map(|_| Mutex::new(Vec::new())).collect(),
            files,
            dir,
            writes: AtomicU64::new(0),
            torn_reads: AtomicU64::new(0),
        }
    }

    fn is_pending(&self, task: usize) -> bool {
        self.claimed_by[task].lock().unwrap().is_empty()
    }

    /// Marks `task` claimed by `agent`, after the round trip that separates
    /// the check from the act.
    fn claim(&self, task: usize, agent: usize) {
        thread::sleep(WINDOW);
        self.claimed_by[task].lock().unwrap().push(agent);
    }

    /// Appends a result line to `file`: read the file, then write it back.
    fn record(&self, file: &Path, line: String) {
        let mut lines = read_lines(file).unwrap_or_default();
        lines.push(line);
        thread::sleep(WINDOW / 3);
        write_file(file, &lines);
        self.writes.fetch_add(1, SeqCst);
    }

    /// Reads `file` as an agent picking up context would, and counts it as
    /// torn if it was caught half written.
    fn check_read(&self, file: &Path) {
        if read_lines(file).is_none() {
            self.torn_reads.fetch_add(1, SeqCst);
        }
    }

    /// (duplicate claims, unclaimed tasks, lost updates, torn reads, corrupt
    /// files).
    fn finish(self) -> [u64; 5] {
        let claims: Vec<usize> = self
            .claimed_by
            .iter()
            .map(|c| c.lock().unwrap().len())
            .collect();
        let duplicates = claims.iter().map(|&n| n.saturating_sub(1)).sum::<usize>();
        let unclaimed = claims.iter().filter(|&&n| n == 0).count();
        // Two writers that rewrite a file at once can leave it interleaved:
        // corrupt, and none of its lines count as kept.
        let contents: Vec<Option<Vec<String>>> = self.files.iter().map(|f| read_lines(f)).collect();
        let corrupt = contents.iter().filter(|c| c.is_none()).count();
        let lines: usize = contents.iter().flatten().map(Vec::len).sum();
        let lost = self.writes.load(SeqCst).saturating_sub(lines as u64);
        fs::remove_dir_all(&self.dir).ok();
        [
            duplicates as u64,
            unclaimed as u64,
            lost,
            self.torn_reads.load(SeqCst),
            corrupt as u64,
        ]
    }
}

/// Writes `lines` and then an `end N` trailer, one `write` call per line, the
/// way a logger or a templating step writes a file.
pub fn write_file(path: &Path, lines: &[String]) {
    let mut file = fs::File::create(path).expect("write a context file");
    for line in lines {
        file.write_all(format!("{line}\n").as_bytes()).unwrap();
    }
    file.write_all(format!("end {}\n", lines.len()).as_bytes())
        .unwrap();
}

/// The result lines of a complete file, or `None` if it is half written (no
/// trailer, or a trailer that does not match the lines above it).
pub fn read_lines(path: &Path) -> Option<Vec<String>> {
    let text = fs::read_to_string(path).ok()?;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let trailer = lines.pop()?;
    let complete = text.ends_with('\n') && trailer == format!("end {}", lines.len());
    complete.then_some(lines)
}

/// One agent, naive: claim by check-then-mark, record by read-then-write.
fn naive_agent(ws: &Workspace, agent: usize) {
    loop {
        // SELECT id FROM tasks WHERE status = 'pending' LIMIT 1
        let Some(task) = (0..ws.claimed_by.len()).find(|&t| ws.is_pending(t)) else {
            return;
        };
        ws.claim(task, agent); // UPDATE tasks SET assigned_to = agent
        ws.record(
            &ws.files[task % FILES],
            format!("task {task}: agent {agent}"),
        );
        ws.check_read(&ws.files[(task + 1) % FILES]);
    }
}

/// One agent, toctou: claim under the task's key, read and write each file
/// under its path's key.
fn toctou_agent(
    ws: &Workspace,
    agent: usize,
    tasks: &KeyedLocks<usize>,
    files: &KeyedRwLocks<PathBuf>,
) {
    loop {
        let mut busy = false;
        let mut claimed = None;
        for task in 0..ws.claimed_by.len() {
            if !ws.is_pending(task) {
                continue;
            }
            // Another agent holding this task's key is claiming it now: skip.
            let Some(_claiming) = tasks.try_lock(&task) else {
                busy = true;
                continue;
            };
            if ws.is_pending(task) {
                ws.claim(task, agent);
                claimed = Some(task);
                break;
            }
        }
        match claimed {
            Some(task) => {
                let file = &ws.files[task % FILES];
                let writing = files.write(file);
                ws.record(file, format!("task {task}: agent {agent}"));
                drop(writing);
                let file = &ws.files[(task + 1) % FILES];
                let _reading = files.read(file);
                ws.check_read(file);
            }
            // Pending tasks that other agents are claiming: look again.
            None if busy => thread::yield_now(),
            None => return,
        }
    }
}

fn metrics([duplicates, unclaimed, lost, torn, corrupt]: [u64; 5]) -> Vec<Metric> {
    vec![
        Metric::expect("duplicate claims", duplicates, 0),
        Metric::expect("unclaimed", unclaimed, 0),
        Metric::expect("lost updates", lost, 0),
        Metric::expect("torn reads", torn, 0),
        Metric::expect("corrupt files at the end", corrupt, 0),
    ]
}

pub fn round(agents: usize) -> Round {
    let tasks = agents * TASKS_PER_AGENT;

    let ws = Workspace::new(tasks, "naive");
    released_together(agents, |agent| naive_agent(&ws, agent));
    let naive = metrics(ws.finish());

    let ws = Workspace::new(tasks, "toctou");
    let (task_locks, file_locks) = (KeyedLocks::new(), KeyedRwLocks::new());
    released_together(agents, |agent| {
        toctou_agent(&ws, agent, &task_locks, &file_locks)
    });
    let mut toctou = metrics(ws.finish());
    let left = task_locks.len() + file_locks.len();
    toctou.push(Metric::expect("entries left", left as u64, 0));
    Round {
        naive,
        toctou,
        ..Round::default()
    }
}
