//! The race report: five check-then-act bugs from production incident
//! write-ups, each run twice, once with the incident's naive check-then-act
//! code written in safe Rust and once with `toctou`, printed as one table.
//! On Linux, three more scenarios race separate processes: two of the
//! incidents again, with processes instead of threads, and the lock-file
//! deletion race. Their processes are this binary, re-executed with
//! `TOCTOU_RACE_ROLE` set (see `procs.rs`).
//!
//! ```text
//! cargo run --release --example race_report [-- --workers N] [--rounds N]
//! ```
//!
//! Every number in the table is measured. The naive rows race for real, so
//! their symptoms vary from run to run; the incidents' race windows (a build that
//! takes 10 ms, a database round trip) are reproduced with short sleeps. The
//! `toctou` rows must be clean on every round: the example exits with status 1
//! if any of them shows a symptom, so CI runs it as a smoke test.

#[cfg(target_os = "linux")]
mod agent_processes;
#[cfg(target_os = "linux")]
mod deletion_race;
#[cfg(target_os = "linux")]
mod manager_processes;
mod orchestrator;
#[cfg(target_os = "linux")]
mod procs;
mod provider_registry;
mod sequence_numbers;
mod server_manager;
mod task_queue;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

/// One number a scenario measured.
pub struct Metric {
    label: &'static str,
    value: u64,
    unit: &'static str,
    /// Whether the value is what a correct program gives.
    ok: bool,
}

impl Metric {
    /// A count that a correct program keeps at `expected`.
    pub fn expect(label: &'static str, value: u64, expected: u64) -> Self {
        Metric {
            label,
            value,
            unit: "",
            ok: value == expected,
        }
    }

    /// A measurement with a unit, checked by the scenario.
    pub fn check(label: &'static str, value: u64, unit: &'static str, ok: bool) -> Self {
        Metric {
            label,
            value,
            unit,
            ok,
        }
    }

    /// A measurement shown for comparison, never a symptom.
    pub fn info(label: &'static str, value: u64, unit: &'static str) -> Self {
        Self::check(label, value, unit, true)
    }
}

/// What one round of a scenario measured. Metrics with the same label in
/// `naive` and `toctou` share a line of the table.
#[derive(Default)]
pub struct Round {
    /// The incident's check-then-act version.
    pub naive: Vec<Metric>,
    /// The same program with `toctou`.
    pub toctou: Vec<Metric>,
    /// Measurements of a third version (such as the incident's own fix), printed
    /// under the table.
    pub reference: Vec<Metric>,
}

/// One scenario at one worker count, over all rounds.
struct Report {
    scenario: String,
    /// What the scenario reproduces, in a few plain words.
    what: &'static str,
    workers: usize,
    rounds: Vec<Round>,
    time: Duration,
}

/// A metric's values over all rounds: `v` when every round agreed, else
/// `min-max`, then the unit.
fn span(values: &[&Metric]) -> String {
    let min = values.iter().map(|m| m.value).min().unwrap();
    let max = values.iter().map(|m| m.value).max().unwrap();
    let mut out = min.to_string();
    if max != min {
        write!(out, "-{max}").unwrap();
    }
    if !values[0].unit.is_empty() {
        write!(out, " {}", values[0].unit).unwrap();
    }
    out
}

/// `label`'s metric in each round, from one variant's list.
fn column<'a>(
    rounds: &'a [Round],
    variant: fn(&Round) -> &Vec<Metric>,
    label: &str,
) -> Vec<&'a Metric> {
    rounds
        .iter()
        .filter_map(|r| variant(r).iter().find(|m| m.label == label))
        .collect()
}

fn symptom_rounds(rounds: &[Round], variant: fn(&Round) -> &Vec<Metric>) -> usize {
    rounds
        .iter()
        .filter(|r| variant(r).iter().any(|m| !m.ok))
        .count()
}

impl Report {
    fn naive_races(&self) -> usize {
        symptom_rounds(&self.rounds, |r| &r.naive)
    }

    fn toctou_symptoms(&self) -> usize {
        symptom_rounds(&self.rounds, |r| &r.toctou)
    }

    /// The table lines of this scenario: (measured, naive, toctou).
    fn lines(&self) -> Vec<[String; 3]> {
        let first = &self.rounds[0];
        let mut labels: Vec<&str> = first.naive.iter().map(|m| m.label).collect();
        for m in &first.toctou {
            if !labels.contains(&m.label) {
                labels.push(m.label);
            }
        }
        let cell = |values: Vec<&Metric>| {
            if values.is_empty() {
                "-".to_owned()
            } else {
                // Marks a value that differs from what a correct program gives.
                let mark = if values.iter().any(|m| !m.ok) {
                    " !"
                } else {
                    ""
                };
                format!("{}{mark}", span(&values))
            }
        };
        let mut lines: Vec<[String; 3]> = labels
            .into_iter()
            .map(|label| {
                [
                    label.to_owned(),
                    cell(column(&self.rounds, |r| &r.naive, label)),
                    cell(column(&self.rounds, |r| &r.toctou, label)),
                ]
            })
            .collect();
        let n = self.rounds.len();
        lines.push([
            "rounds with a symptom".to_owned(),
            format!("{}/{n}", self.naive_races()),
            format!("{}/{n}", self.toctou_symptoms()),
        ]);
        lines
    }
}

/// Runs `round` `rounds` times.
fn run(
    scenario: String,
    what: &'static str,
    workers: usize,
    rounds: usize,
    round: fn(usize) -> Round,
) -> Report {
    eprint!("  {scenario}, {workers} workers, {rounds} round(s) ... ");
    let started = Instant::now();
    let results: Vec<Round> = (0..rounds).map(|_| round(workers)).collect();
    let time = started.elapsed();
    eprintln!("{time:.2?}");
    Report {
        scenario,
        what,
        workers,
        rounds: results,
        time,
    }
}

/// Runs `work(i)` for `i` in `0..threads` on that many threads, released
/// together so that they reach the check at the same moment, and returns
/// the results in order.
pub fn released_together<R: Send>(threads: usize, work: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let barrier = Barrier::new(threads);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    barrier.wait();
                    work(i)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn print_table(reports: &[Report]) {
    let header = [
        "scenario",
        "workers",
        "measured",
        "naive check-then-act",
        "toctou",
    ];
    let mut rows: Vec<[String; 5]> = Vec::new();
    for report in reports {
        // The scenario column: its name, what it reproduces, how long it ran.
        let titles = [
            report.scenario.clone(),
            format!("  {}", report.what),
            format!("  {} round(s) in {:.0?}", report.rounds.len(), report.time),
        ];
        let mut lines = report.lines();
        lines.resize_with(lines.len().max(titles.len()), Default::default);
        for (i, [measured, naive, toctou]) in lines.into_iter().enumerate() {
            let scenario = titles.get(i).cloned().unwrap_or_default();
            let workers = if i == 0 {
                report.workers.to_string()
            } else {
                String::new()
            };
            rows.push([scenario, workers, measured, naive, toctou]);
        }
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            match i {
                0 | 2 => write!(out, "{cell:<w$}  ").unwrap(),
                _ => write!(out, "{cell:>w$}  ").unwrap(),
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    let rule = widths.map(|w| "-".repeat(w));
    line(rule.each_ref().map(String::as_str));
    for (i, row) in rows.iter().enumerate() {
        if i > 0 && !row[0].is_empty() && !row[0].starts_with(' ') {
            println!();
        }
        line(row.each_ref().map(String::as_str));
    }
    println!("\n! marks a value that a correct program would not give.");
    for report in reports {
        let reference = &report.rounds[0].reference;
        for metric in reference {
            let values = column(&report.rounds, |r| &r.reference, metric.label);
            println!("{}: {} {}", report.scenario, metric.label, span(&values));
        }
    }
}

fn usage(problem: Option<&str>) -> ExitCode {
    if let Some(problem) = problem {
        eprintln!("race_report: {problem}\n");
    }
    eprintln!(
        "usage: cargo run --release --example race_report [-- OPTIONS]\n\
         \n\
         Runs five check-then-act bugs from production incident write-ups,\n\
         each with the naive check-then-act code and with toctou, and prints\n\
         what each one did. On Linux, three more race separate processes.\n\
         \n\
         Options:\n  \
           --workers N   threads (or async emits) per scenario, 2 to 1000\n                \
                         (default: each scenario's own, as in its incident; the\n                \
                         provider registry runs with 10 and with 200); the\n                \
                         cross-process scenarios run N processes, at most 8\n                \
                         (default 4)\n  \
           --rounds N    run each scenario N times, 1 to 100 (default 3)\n  \
           --help        print this and exit\n\
         \n\
         Exit status: 0 if every toctou row is clean, 1 if one showed a\n\
         symptom, 2 on bad arguments."
    );
    if problem.is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// The value after `flag`, as a number in `range`.
fn number(
    flag: &str,
    value: Option<String>,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a number"))?;
    match value.parse::<usize>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "{flag} takes a number from {} to {}, not {value:?}",
            range.start(),
            range.end()
        )),
    }
}

/// Processes per cross-process scenario: `--workers`, capped at 8 (a
/// process costs milliseconds to start, and the machine has few cores).
#[cfg(target_os = "linux")]
fn processes(workers: Option<usize>) -> usize {
    workers.map_or(4, |n| n.min(8))
}

fn main() -> ExitCode {
    // A child process of a cross-process scenario plays its role and exits.
    #[cfg(target_os = "linux")]
    if let Some(status) = procs::child_main() {
        return status;
    }
    let (mut workers, mut rounds) = (None, 3);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let parsed = match arg.as_str() {
            "--help" | "-h" => return usage(None),
            "--workers" => number("--workers", args.next(), 2..=1000).map(|n| workers = Some(n)),
            "--rounds" => number("--rounds", args.next(), 1..=100).map(|n| rounds = n),
            other => Err(format!("unknown argument {other:?}")),
        };
        if let Err(problem) = parsed {
            return usage(Some(&problem));
        }
    }

    eprintln!("running the incident scenarios, naive and toctou:");
    let mut reports = vec![
        run(
            "1 orchestrator singleton".into(),
            "threads race to build one global",
            workers.unwrap_or(10),
            rounds,
            orchestrator::round,
        ),
        run(
            "2 model server manager".into(),
            "chats race to start a model's server",
            workers.unwrap_or(10),
            rounds,
            server_manager::round,
        ),
        run(
            "3 agents claiming tasks".into(),
            "agents race to claim tasks, write files",
            workers.unwrap_or(8),
            rounds,
            task_queue::round,
        ),
    ];
    // The provider registry runs at two sizes by default, the incident's two
    // measurements: 6 unique registries for 10 workers, 47 for 200.
    let registry_rows: &[(usize, &str)] = match workers {
        Some(n) => &[(n, "")],
        None => &[
            (10, " (incident: 6 unique)"),
            (200, " (incident: 47 unique)"),
        ],
    };
    for &(n, incident) in registry_rows {
        reports.push(run(
            format!("4 provider registry{incident}"),
            "workers race to build one registry",
            n,
            rounds,
            provider_registry::round,
        ));
    }
    reports.push(run(
        "5 workflow sequence numbers".into(),
        "emits race to create a workflow's lock",
        workers.unwrap_or(10),
        rounds,
        sequence_numbers::round,
    ));
    #[cfg(target_os = "linux")]
    {
        let processes = processes(workers);
        reports.push(run(
            "6 agents as processes".into(),
            "agent processes race on files",
            processes,
            rounds,
            agent_processes::round,
        ));
        reports.push(run(
            "7 manager processes".into(),
            "processes race to start a server",
            processes,
            rounds,
            manager_processes::round,
        ));
        reports.push(run(
            "8 lock-file deletion race".into(),
            "processes delete a lock file",
            processes,
            rounds,
            deletion_race::round,
        ));
    }

    println!();
    print_table(&reports);
    let naive_races = reports.iter().filter(|r| r.naive_races() > 0).count();
    let dirty: Vec<&str> = reports
        .iter()
        .filter(|r| r.toctou_symptoms() > 0)
        .map(|r| r.scenario.as_str())
        .collect();
    println!(
        "\nnaive scenarios that raced: {naive_races} of {n}. toctou scenarios with a symptom: {} of {n}.",
        dirty.len(),
        n = reports.len(),
    );
    if dirty.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("toctou showed a symptom in: {}", dirty.join("; "));
        ExitCode::FAILURE
    }
}
