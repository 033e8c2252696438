//! `toctou-postgres` against the local server, side by side with the raw
//! advisory-lock round trips (the floors) and sqlx's `PgAdvisoryLock` (the
//! anchor), in one run. Without a server it prints why and measures
//! nothing.
//!
//! Groups:
//! - `pg_uncontended`: one acquire + release of a key nobody else wants.
//!   Floors: `SELECT pg_advisory_lock($1)` + `SELECT pg_advisory_unlock($1)`
//!   on one connection (two round trips), and the same with
//!   `pg_try_advisory_lock`. Anchor: sqlx's `PgAdvisoryLock::acquire` +
//!   `release_now` on one pooled connection. Ours: `lock` + `release`,
//!   which also issues the fencing token in the lock's round trip. Every
//!   statement is prepared once, ours and the floors'. Target: at most 1.5x
//!   the lock+unlock floor.
//! - `pg_throughput_8_tasks_100_keys`: 8 tasks, each locking and releasing
//!   its own run through 100 keys (ours only; one iteration is 800
//!   acquisitions).
//! - Printed, not a criterion group: the hand-over latency between two
//!   processes (the bench binary re-executes itself as the waiter): the
//!   waiter is woken by the holder's release `NOTIFY`; p50 and p99 of 200
//!   hand-overs, timed on the system-wide clock. Target: p99 at most 5 ms.
//!
//! Run: `cargo bench -p toctou-postgres --bench pg_locks`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use toctou_postgres::PgLocks;
use tokio_postgres::NoTls;

fn url() -> String {
    std::env::var("TOCTOU_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var(ROLE).is_ok() {
        rt.block_on(waiter_process());
        return;
    }
    let raw = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&url(), NoTls),
        )
        .await
    });
    let raw = match raw {
        Ok(Ok((client, connection))) => {
            rt.spawn(async move {
                let _ = connection.await;
            });
            client
        }
        _ => {
            println!(
                "pg_locks: no PostgreSQL at {} (set TOCTOU_PG_URL); nothing measured",
                url()
            );
            return;
        }
    };
    let ours = rt.block_on(PgLocks::connect(&url())).unwrap();
    let pool = rt
        .block_on(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&url()),
        )
        .unwrap();
    let mut c = Criterion::default().configure_from_args();
    {
        let mut g = c.benchmark_group("pg_uncontended");
        g.sample_size(30);
        g.measurement_time(Duration::from_secs(4));
        let key = format!("bench-{}", std::process::id());
        g.bench_function("toctou_postgres::PgLocks::lock+release (with fence)", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let guard = ours.lock(black_box(&key)).await.unwrap();
                    guard.release().await.unwrap();
                })
            })
        });
        let advisory: i64 = 0x7463_7475;
        // Prepared once, as ours are: each statement is one round trip.
        let (lock, try_lock, unlock) = rt.block_on(async {
            (
                raw.prepare("SELECT pg_advisory_lock($1)").await.unwrap(),
                raw.prepare("SELECT pg_try_advisory_lock($1)")
                    .await
                    .unwrap(),
                raw.prepare("SELECT pg_advisory_unlock($1)").await.unwrap(),
            )
        });
        g.bench_function("floor: pg_advisory_lock + pg_advisory_unlock", |b| {
            b.iter(|| {
                rt.block_on(async {
                    raw.query_one(&lock, &[&advisory]).await.unwrap();
                    raw.query_one(&unlock, &[&advisory]).await.unwrap();
                })
            })
        });
        g.bench_function("floor: pg_try_advisory_lock + pg_advisory_unlock", |b| {
            b.iter(|| {
                rt.block_on(async {
                    raw.query_one(&try_lock, &[&advisory]).await.unwrap();
                    raw.query_one(&unlock, &[&advisory]).await.unwrap();
                })
            })
        });
        // Our own two statements, prepared, with nothing around them: what
        // the protocol costs on the wire and in the server.
        let (ours_try, ours_unlock) = rt.block_on(async {
            (
                raw.prepare(toctou_postgres::protocol::TRY_LOCK)
                    .await
                    .unwrap(),
                raw.prepare(toctou_postgres::protocol::UNLOCK)
                    .await
                    .unwrap(),
            )
        });
        let protocol_key = format!("bench-protocol-{}", std::process::id());
        g.bench_function(
            "floor: our two statements (try+fence, unlock+notify)",
            |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let row = raw.query_one(&ours_try, &[&protocol_key]).await.unwrap();
                        let (advisory, waiting): (i64, i64) = (row.get(0), row.get(3));
                        raw.query_one(&ours_unlock, &[&advisory, &waiting])
                            .await
                            .unwrap();
                    })
                })
            },
        );
        // A durable (logged) counter instead, for comparison: its commit
        // waits for a WAL flush.
        rt.block_on(raw.batch_execute(
            "CREATE TABLE IF NOT EXISTS toctou_bench_logged_counter \
             (digest bytea PRIMARY KEY, token bigint NOT NULL)",
        ))
        .unwrap();
        let logged = rt
            .block_on(raw.prepare(
                "INSERT INTO toctou_bench_logged_counter AS t (digest, token) \
                 VALUES (sha256(convert_to($1, 'UTF8')), 1) \
                 ON CONFLICT (digest) DO UPDATE SET token = t.token + 1 RETURNING t.token",
            ))
            .unwrap();
        g.bench_function(
            "a logged counter's upsert alone (waits for an fsync)",
            |b| {
                b.iter(|| {
                    rt.block_on(async { raw.query_one(&logged, &[&protocol_key]).await.unwrap() })
                })
            },
        );
        let lock = sqlx::postgres::PgAdvisoryLock::new(format!("sqlx-{key}"));
        g.bench_function("sqlx::postgres::PgAdvisoryLock::acquire+release_now", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let conn = pool.acquire().await.unwrap();
                    let guard = lock.acquire(conn).await.unwrap();
                    let _conn = guard.release_now().await.unwrap();
                })
            })
        });
        g.finish();
    }
    {
        let mut g = c.benchmark_group("pg_throughput_8_tasks_100_keys");
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(6));
        g.throughput(Throughput::Elements(800));
        g.bench_function("toctou_postgres::PgLocks::lock+release", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let tasks: Vec<_> = (0..8)
                        .map(|t| {
                            let ours = ours.clone();
                            tokio::spawn(async move {
                                for k in 0..100 {
                                    let key = format!("bench-tp-{t}-{k}");
                                    ours.lock(&key).await.unwrap().release().await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                })
            })
        });
        g.finish();
    }
    rt.block_on(hand_over_latency());
}

/// The environment variable that makes the bench binary the second process
/// of the hand-over measurement.
const ROLE: &str = "TOCTOU_PG_BENCH_ROLE";

/// Now on the system-wide clock (both processes of the hand-over read it),
/// in nanoseconds.
fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The second process: for each line on stdin (a key), locks it, prints
/// the time it got it, and releases.
async fn waiter_process() {
    use tokio::io::AsyncBufReadExt;
    let locks = PgLocks::connect(&url()).await.unwrap();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(key)) = lines.next_line().await {
        let guard = locks.lock(&key).await.unwrap();
        let got = now_ns();
        guard.release().await.unwrap();
        println!("{got}");
    }
}

/// p50 and p99 of 200 hand-overs from this process to a second one (the
/// bench binary re-executed): this process holds a key, the other starts
/// waiting for it, this one releases; the hand-over lasts from just before
/// the release until the other holds the key.
async fn hand_over_latency() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "waiter")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let holder = PgLocks::connect(&url()).await.unwrap();
    let mut latencies = Vec::new();
    for i in 0..200 {
        let key = format!("bench-handover-{}-{i}", std::process::id());
        let held = holder.lock(&key).await.unwrap();
        to_child
            .write_all(format!("{key}\n").as_bytes())
            .await
            .unwrap();
        to_child.flush().await.unwrap();
        // Let the other process try, fail and start waiting.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let released = now_ns();
        held.release().await.unwrap();
        let got: u128 = from_child
            .next_line()
            .await
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        latencies.push(Duration::from_nanos(got.saturating_sub(released) as u64));
    }
    drop(to_child);
    let _ = child.wait().await;
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "pg_hand_over_2_processes: p50 {:?}, p99 {:?}, max {:?} (200 hand-overs; target p99 <= 5 ms)",
        p(0.5),
        p(0.99),
        latencies.last().unwrap()
    );
}
