//! `toctou-postgres` against a real PostgreSQL server (`TOCTOU_PG_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Without a server each test prints that it is skipped, and why, and
//! passes; under `CI=true` a missing server fails it, so CI cannot go green
//! by skipping. Several processes: the test binary re-executes itself
//! (`TOCTOU_PG_ROLE`, read by `child_process_entry`, which returns at once
//! when the variable is absent).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use toctou_postgres::{Error, PgLocks};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::{Client, Config, NoTls};

const ROLE: &str = "TOCTOU_PG_ROLE";
const KEY: &str = "TOCTOU_PG_KEY";

fn url() -> String {
    std::env::var("TOCTOU_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// An admin connection, or `None` (the test is skipped, with the reason
/// printed) when no server answers. Under `CI=true` that is a failure.
async fn admin(test: &str) -> Option<Client> {
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&url(), NoTls),
    )
    .await;
    let why = match connected {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            return Some(client);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5 s".to_owned(),
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: no PostgreSQL at {} under CI=true: {why}", url());
    }
    eprintln!(
        "{test}: SKIPPED: no PostgreSQL at {} ({why}); set TOCTOU_PG_URL to run it",
        url()
    );
    None
}

/// A name no other test or run uses.
fn unique(name: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn config_as(app: &str) -> Config {
    let mut config: Config = url().parse().unwrap();
    config.application_name(app);
    config
}

async fn connect_as(app: &str) -> PgLocks {
    PgLocks::builder()
        .connect_with(config_as(app))
        .await
        .unwrap()
}

/// The connections a client opened, by application name.
async fn connections(admin: &Client, app: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

/// The backend that holds the advisory lock `advisory`, if any.
async fn holder_pid(admin: &Client, advisory: i64) -> Option<i32> {
    admin
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1",
            &[&advisory],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

/// Advisory locks held by the sessions of client `app`.
async fn advisory_locks_of(admin: &Client, app: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

/// A new row of the fenced resource that the documented pattern guards.
async fn fenced_resource(admin: &Client) -> String {
    let resource = unique("resource");
    admin
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS toctou_test_fenced \
             (id text PRIMARY KEY, value text, fence bigint NOT NULL)",
        )
        .await
        .unwrap();
    admin
        .execute(
            "INSERT INTO toctou_test_fenced VALUES ($1, NULL, 0)",
            &[&resource],
        )
        .await
        .unwrap();
    resource
}

/// The documented pattern: a write carries its token, and the resource
/// refuses one below the last it accepted. Whether it was accepted.
async fn fenced_write(admin: &Client, resource: &str, value: &str, fence: i64) -> bool {
    admin
        .execute(
            "UPDATE toctou_test_fenced SET value = $1, fence = $2 WHERE id = $3 AND fence <= $2",
            &[&value, &fence, &resource],
        )
        .await
        .unwrap()
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_excludes_another_client_and_fences_increase() {
    let Some(_admin) = admin("a_lock_excludes_another_client_and_fences_increase").await else {
        return;
    };
    let key = unique("basic");
    let a = connect_as("toctou-test-basic-a").await;
    let b = connect_as("toctou-test-basic-b").await;
    let held = a.lock(&key).await.unwrap();
    assert!(held.is_held());
    assert_eq!(held.key(), key);
    assert!(b.try_lock(&key).await.unwrap().is_none());
    let start = Instant::now();
    assert!(
        b.try_lock_for(&key, Duration::from_millis(300))
            .await
            .unwrap()
            .is_none()
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
    let first = held.fence();
    held.release().await.unwrap();
    let next = b.lock(&key).await.unwrap();
    assert!(next.fence() > first, "{} after {first}", next.fence());
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_keep_increasing_when_the_counters_are_emptied() {
    // Crash recovery empties the unlogged counters (the marker of their
    // epoch included), whether or not the postmaster restarts. What it
    // leaves is emulated here; `tests/crash.rs` does it for real.
    let Some(admin) = admin("fences_keep_increasing_when_the_counters_are_emptied").await else {
        return;
    };
    let key = unique("epoch");
    let locks = connect_as("toctou-test-epoch").await;
    let guard = locks.lock(&key).await.unwrap();
    let before = guard.fence();
    guard.release().await.unwrap();
    admin
        .batch_execute("TRUNCATE toctou_fence_count")
        .await
        .unwrap();
    let guard = locks.lock(&key).await.unwrap();
    let after = guard.fence();
    assert!(after > before, "{after} after {before}");
    assert_eq!(
        after & ((1 << 40) - 1),
        1,
        "the counter started over in a new epoch"
    );
    assert!(after >> 40 > before >> 40, "a new epoch");
    guard.release().await.unwrap();
    let guard = locks.lock(&key).await.unwrap();
    assert_eq!(guard.fence(), after + 1);
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_future_dropped_after_its_try_took_the_lock_leaves_nothing() {
    let Some(admin) =
        admin("a_lock_future_dropped_after_its_try_took_the_lock_leaves_nothing").await
    else {
        return;
    };
    let app = unique("toctou-test-dropped");
    let locks = connect_as(&app).await;
    let mut dropped_in_flight = 0;
    for _ in 0..20 {
        let key = unique("dropped");
        let future = locks.lock(&key);
        tokio::pin!(future);
        // One poll: the try is sent. On a multi-threaded runtime the round
        // trip may, rarely, complete within that poll; then there is
        // nothing in flight to drop this time.
        tokio::select! {
            biased;
            guard = &mut future => {
                guard.unwrap().release().await.unwrap();
                continue;
            }
            _ = std::future::ready(()) => {}
        }
        dropped_in_flight += 1;
        // The try completes meanwhile; the future is dropped without
        // looking at its answer.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dropped_in_flight > 0, "no try was dropped in flight");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        advisory_locks_of(&admin, &app).await,
        0,
        "a taken lock was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_retries_on_its_timer_while_other_keys_are_announced() {
    // The holder's session ends without a release (terminated): nobody
    // announces the key, and the waiter must find it on its retry timer,
    // even while releases of other keys are announced more often than the
    // timer's period.
    let Some(admin) = admin("a_waiter_retries_on_its_timer_while_other_keys_are_announced").await
    else {
        return;
    };
    let key = unique("unannounced");
    let holder = connect_as("toctou-test-unannounced-holder").await;
    let waiter = connect_as("toctou-test-unannounced-waiter").await;
    let noisy = connect_as("toctou-test-unannounced-noise").await;
    let held = holder.lock(&key).await.unwrap();
    let pid = holder_pid(&admin, held.advisory_key()).await.unwrap();
    let waiting = tokio::spawn({
        let (waiter, key) = (waiter.clone(), key.clone());
        async move { waiter.lock(&key).await.unwrap() }
    });
    let noise = tokio::spawn({
        let other = unique("noise");
        async move {
            for _ in 0..60 {
                noisy.lock(&other).await.unwrap().release().await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the waiter retried on its timer (0.5 s)")
        .unwrap();
    got.release().await.unwrap();
    noise.abort();
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiting_client_without_waiting_for_the_poll() {
    let Some(_admin) = admin("a_release_wakes_a_waiting_client_without_waiting_for_the_poll").await
    else {
        return;
    };
    let key = unique("notify");
    let a = connect_as("toctou-test-notify-a").await;
    // A poll so slow that only the NOTIFY can wake the waiter in time.
    let b = PgLocks::builder()
        .poll_interval(Duration::from_secs(30))
        .connect_with(config_as("toctou-test-notify-b"))
        .await
        .unwrap();
    let held = a.lock(&key).await.unwrap();
    let waiter = tokio::spawn({
        let (b, key) = (b.clone(), key.clone());
        async move { b.lock(&key).await.map(|g| (g, Instant::now())) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    held.release().await.unwrap();
    let (guard, got) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was not woken")
        .unwrap()
        .unwrap();
    println!("hand-over after {:?}", got - released);
    assert!(got - released < Duration::from_secs(5));
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_session_is_lost_and_the_key_moves_on_with_a_larger_fence() {
    let Some(admin) =
        admin("a_terminated_session_is_lost_and_the_key_moves_on_with_a_larger_fence").await
    else {
        return;
    };
    let key = unique("terminate");
    let resource = fenced_resource(&admin).await;
    let a = connect_as("toctou-test-terminate-a").await;
    let b = connect_as("toctou-test-terminate-b").await;
    let held = a.lock(&key).await.unwrap();
    let old_fence = held.fence();
    assert!(fenced_write(&admin, &resource, "a", old_fence).await);
    let pid = holder_pid(&admin, held.advisory_key())
        .await
        .expect("a holder");
    let lost = held.lost();
    let killed = Instant::now();
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(3), lost)
        .await
        .expect("lost() resolves within the heartbeat bound");
    println!("lost after {:?}", killed.elapsed());
    assert!(!held.is_held());
    let next = b.lock(&key).await.unwrap();
    assert!(next.fence() > old_fence);
    assert!(fenced_write(&admin, &resource, "b", next.fence()).await);
    assert!(
        !fenced_write(&admin, &resource, "a, late", old_fence).await,
        "a stale token is refused"
    );
    assert!(matches!(held.release().await, Err(Error::Lost)));
    next.release().await.unwrap();
    // The first client reconnects for its next lock.
    let again = a.lock(&key).await.unwrap();
    assert!(again.is_held());
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_waiters_on_a_hundred_keys_use_two_connections() {
    let Some(admin) = admin("a_thousand_waiters_on_a_hundred_keys_use_two_connections").await
    else {
        return;
    };
    let prefix = unique("waiters");
    let keys: Vec<String> = (0..100).map(|i| format!("{prefix}-{i}")).collect();
    let holder = connect_as("toctou-test-waiters-holder").await;
    let app = unique("toctou-test-waiters");
    let waiters = connect_as(&app).await;
    let mut held = Vec::new();
    for key in &keys {
        held.push(holder.lock(key).await.unwrap());
    }
    let granted = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let (waiters, key, granted) = (waiters.clone(), keys[i % 100].clone(), granted.clone());
            tokio::spawn(async move {
                let guard = waiters.lock(&key).await.unwrap();
                granted.fetch_add(1, Ordering::Relaxed);
                guard.release().await.unwrap();
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(granted.load(Ordering::Relaxed), 0);
    assert_eq!(
        connections(&admin, &app).await,
        2,
        "one holding session, one listener"
    );
    for guard in held {
        guard.release().await.unwrap();
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every waiter is granted")
            .unwrap();
    }
    assert_eq!(granted.load(Ordering::Relaxed), 1000);
    assert_eq!(connections(&admin, &app).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_lock_futures_leave_no_lock_on_the_server() {
    let Some(admin) = admin("cancelled_lock_futures_leave_no_lock_on_the_server").await else {
        return;
    };
    let key = unique("cancel");
    let holder = connect_as("toctou-test-cancel-holder").await;
    let app = unique("toctou-test-cancel");
    let waiters = connect_as(&app).await;
    let held = holder.lock(&key).await.unwrap();
    // 1,000 waits cancelled at once, while the key is held elsewhere.
    for _ in 0..1000 {
        let _ = tokio::time::timeout(Duration::from_micros(50), waiters.lock(&key)).await;
    }
    held.release().await.unwrap();
    // And cancellations that race grants: each may be dropped while its
    // try is in flight on the server, after it took the lock.
    for i in 0..200u64 {
        let _ = tokio::time::timeout(Duration::from_micros(i * 10), waiters.lock(&key)).await;
    }
    // Tries that were in flight finish in the background.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        advisory_locks_of(&admin, &app).await,
        0,
        "a lock was left behind"
    );
    // No in-process waiter was left queued either: the key is free here.
    let guard = waiters.try_lock(&key).await.unwrap().expect("free");
    guard.release().await.unwrap();
    assert_eq!(advisory_locks_of(&admin, &app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_keys_and_bad_servers_get_clear_answers() {
    // Without a server: an unreachable URL and an invalid one are errors,
    // not hangs or panics.
    let unreachable = tokio::time::timeout(
        Duration::from_secs(20),
        PgLocks::connect("postgres://postgres@127.0.0.1:1/test"),
    )
    .await
    .expect("no hang");
    assert!(
        matches!(unreachable, Err(Error::Connect(_))),
        "{unreachable:?}"
    );
    assert!(matches!(
        PgLocks::connect("not a url").await,
        Err(Error::Connect(_))
    ));
    let Some(_admin) = admin("odd_keys_and_bad_servers_get_clear_answers").await else {
        return;
    };
    let mut wrong_user = config_as("toctou-test-bad");
    wrong_user.user("no_such_user_toctou");
    let refused = PgLocks::builder().connect_with(wrong_user).await;
    assert!(matches!(refused, Err(Error::Connect(_))), "{refused:?}");
    let locks = connect_as("toctou-test-odd").await;
    let tag = unique("");
    let huge = format!("{tag}{}", "x".repeat(1 << 20));
    for key in [
        String::new(),
        format!("{tag}\0nul"),
        format!("{tag}\u{fffd}\u{7f}é漢"),
        format!("{tag}../../etc/passwd"),
        huge,
    ] {
        let first = locks.lock(&key).await.unwrap();
        assert_eq!(first.key(), key);
        assert!(locks.try_lock(&key).await.unwrap().is_none());
        let fence = first.fence();
        first.release().await.unwrap();
        let second = locks.lock(&key).await.unwrap();
        assert!(second.fence() > fence);
        second.release().await.unwrap();
    }
}

/// The child side. Returns at once in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let key = std::env::var(KEY).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (admin, connection) = tokio_postgres::connect(&url(), NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let admin = Arc::new(admin);
        let locks = connect_as("toctou-test-child").await;
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let (locks, admin, key, role) =
                    (locks.clone(), admin.clone(), key.clone(), role.clone());
                tokio::spawn(async move {
                    for round in 0..ROUNDS {
                        match role.as_str() {
                            "counter" => {
                                let guard = locks.lock(&key).await.unwrap();
                                // Read, then write, in two autocommit
                                // statements: only the lock keeps them
                                // together.
                                let n: i64 = admin
                                    .query_one(
                                        "SELECT n FROM toctou_test_counter WHERE id = $1",
                                        &[&key],
                                    )
                                    .await
                                    .unwrap()
                                    .get(0);
                                tokio::task::yield_now().await;
                                admin
                                    .execute(
                                        "UPDATE toctou_test_counter SET n = $1 WHERE id = $2",
                                        &[&(n + 1), &key],
                                    )
                                    .await
                                    .unwrap();
                                guard.release().await.unwrap();
                            }
                            "sequence" => {
                                let workflow = format!("{key}-wf{}", (t + round) % 3);
                                let guard = locks.lock(&workflow).await.unwrap();
                                let max: Option<i64> = admin
                                    .query_one(
                                        "SELECT max(seq) FROM toctou_test_seq WHERE workflow = $1",
                                        &[&workflow],
                                    )
                                    .await
                                    .unwrap()
                                    .get(0);
                                tokio::task::yield_now().await;
                                admin
                                    .execute(
                                        "INSERT INTO toctou_test_seq VALUES ($1, $2)",
                                        &[&workflow, &(max.unwrap_or(0) + 1)],
                                    )
                                    .await
                                    .unwrap();
                                guard.release().await.unwrap();
                            }
                            other => panic!("unknown role {other}"),
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
}

const ROUNDS: usize = 10;
const PROCESSES: usize = 4;

fn run_children(role: &str, key: &str) {
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "child_process_entry",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ROLE, role)
                .env(KEY, key)
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a child failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_increment_a_counter_row_without_losing_an_update() {
    let Some(admin) = admin("processes_increment_a_counter_row_without_losing_an_update").await
    else {
        return;
    };
    let key = unique("counter");
    admin
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS toctou_test_counter (id text PRIMARY KEY, n bigint)",
        )
        .await
        .unwrap();
    admin
        .execute("INSERT INTO toctou_test_counter VALUES ($1, 0)", &[&key])
        .await
        .unwrap();
    let child_key = key.clone();
    tokio::task::spawn_blocking(move || run_children("counter", &child_key))
        .await
        .unwrap();
    let n: i64 = admin
        .query_one("SELECT n FROM toctou_test_counter WHERE id = $1", &[&key])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, (PROCESSES * 8 * ROUNDS) as i64, "lost updates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_emit_each_workflows_sequence_numbers_exactly_once() {
    let Some(admin) = admin("processes_emit_each_workflows_sequence_numbers_exactly_once").await
    else {
        return;
    };
    let key = unique("seq");
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS toctou_test_seq (workflow text, seq bigint)")
        .await
        .unwrap();
    let child_key = key.clone();
    tokio::task::spawn_blocking(move || run_children("sequence", &child_key))
        .await
        .unwrap();
    let mut total = 0;
    for wf in 0..3 {
        let workflow = format!("{key}-wf{wf}");
        let seqs: Vec<i64> = admin
            .query(
                "SELECT seq FROM toctou_test_seq WHERE workflow = $1 ORDER BY seq",
                &[&workflow],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "{workflow}: duplicates or gaps");
        total += seqs.len();
    }
    assert_eq!(total, PROCESSES * 8 * ROUNDS);
}

/// A TCP proxy between a client and the server that can be frozen: while
/// frozen it forwards nothing in either direction and closes nothing. It
/// can also close every connection (`cut_all`), and refuse new ones
/// (`down`: accepted and closed at once, as a restarting server does).
struct Proxy {
    port: u16,
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
    /// Bumped to close every connection open at that moment.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    down: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Proxy {
    async fn start(server: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(tokio::sync::watch::Sender::new(false));
        let generation = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let down = Arc::new(tokio::sync::watch::Sender::new(false));
        let server = server.to_owned();
        let (f, g, d) = (frozen.clone(), generation.clone(), down.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *d.borrow() {
                    drop(client);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(&server).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                let born = *g.borrow();
                tokio::spawn(pump(cr, uw, f.subscribe(), g.subscribe(), born));
                tokio::spawn(pump(ur, cw, f.subscribe(), g.subscribe(), born));
            }
        });
        Proxy {
            port,
            frozen,
            generation,
            down,
        }
    }

    /// Closes every connection open now (both sides).
    fn cut_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// A config for the server behind this proxy: `base`'s user, database
    /// and password, this proxy's address. (A fresh `Config`: `host` and
    /// `port` add to a parsed one's lists.)
    fn config(&self, base: &Config, app: &str) -> Config {
        let mut through = Config::new();
        through
            .host("127.0.0.1")
            .port(self.port)
            .application_name(app);
        if let Some(user) = base.get_user() {
            through.user(user);
        }
        if let Some(db) = base.get_dbname() {
            through.dbname(db);
        }
        if let Some(password) = base.get_password() {
            through.password(password);
        }
        through
    }
}

/// Copies `from` to `to`, holding bytes back while frozen; stops (dropping
/// both halves) once the generation moves past `born`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
    mut generation: tokio::sync::watch::Receiver<u64>,
    born: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Do not even read while frozen: nothing is acknowledged upstream
        // beyond what the kernel buffers.
        tokio::select! {
            _ = frozen.wait_for(|f| !*f) => {}
            _ = generation.wait_for(|g| *g != born) => return,
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = generation.wait_for(|g| *g != born) => return,
            _ = frozen.wait_for(|f| *f) => continue,
        };
        tokio::select! {
            _ = frozen.wait_for(|f| !*f) => {}
            _ = generation.wait_for(|g| *g != born) => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The server's address, from `TOCTOU_PG_URL`.
fn server_address(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_during_a_hold_reports_lost_and_errors_until_it_is_back() {
    let Some(_admin) =
        admin("a_server_restart_during_a_hold_reports_lost_and_errors_until_it_is_back").await
    else {
        return;
    };
    let config: Config = url().parse().unwrap();
    let proxy = Proxy::start(&server_address(&config)).await;
    let locks = PgLocks::builder()
        .connect_with(proxy.config(&config, "toctou-test-restart"))
        .await
        .unwrap();
    let key = unique("restart");
    let held = locks.lock(&key).await.unwrap();
    let fence = held.fence();
    let lost = held.lost();
    // The server goes away: every connection closes, new ones are refused.
    proxy.down.send_replace(true);
    proxy.cut_all();
    tokio::time::timeout(Duration::from_secs(3), lost)
        .await
        .expect("the holder learns of the loss");
    assert!(!held.is_held());
    let while_down = tokio::time::timeout(Duration::from_secs(30), locks.lock(&unique("other")))
        .await
        .expect("an error, not a hang");
    assert!(
        matches!(
            while_down,
            Err(Error::Connect(_) | Error::Query(_) | Error::Timeout)
        ),
        "{while_down:?}"
    );
    assert!(matches!(held.release().await, Err(Error::Lost)));
    // The server is back: the next lock reconnects.
    proxy.down.send_replace(false);
    let again = tokio::time::timeout(Duration::from_secs(30), locks.lock(&key))
        .await
        .expect("no hang")
        .unwrap();
    assert!(again.fence() > fence);
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_holder_learns_of_the_loss_before_the_server_frees_the_key() {
    let Some(admin) =
        admin("a_partitioned_holder_learns_of_the_loss_before_the_server_frees_the_key").await
    else {
        return;
    };
    let config: Config = url().parse().unwrap();
    let proxy = Proxy::start(&server_address(&config)).await;
    let through = proxy.config(&config, "toctou-test-partition-a");
    let server_bound = Duration::from_secs(4);
    let a = PgLocks::builder()
        .server_bound(server_bound)
        .connect_with(through)
        .await
        .unwrap();
    let b = connect_as("toctou-test-partition-b").await;
    let key = unique("partition");
    let held = a.lock(&key).await.unwrap();
    let old_fence = held.fence();
    let lost = held.lost();
    let frozen_at = Instant::now();
    proxy.frozen.send_replace(true);
    tokio::time::timeout(server_bound, lost)
        .await
        .expect("the holder learns of the loss before the server's bound");
    let learned = frozen_at.elapsed();
    println!("the frozen holder learned of the loss after {learned:?}");
    assert!(!held.is_held());
    // The server still has the session (a loopback proxy answers the
    // keepalives itself): the key is not free yet.
    assert!(b.try_lock(&key).await.unwrap().is_none());
    // Stand in for the server's keepalive expiry at its bound: close the
    // proxy's server side. Only then can the second client get the key.
    tokio::time::sleep(server_bound.saturating_sub(frozen_at.elapsed())).await;
    proxy.cut_all();
    let next = tokio::time::timeout(Duration::from_secs(10), b.lock(&key))
        .await
        .expect("the key is freed with the session")
        .unwrap();
    assert!(next.fence() > old_fence);
    // The resource takes the new holder's write; the frozen holder's write
    // with its old token, arriving late, is refused.
    let resource = fenced_resource(&admin).await;
    assert!(fenced_write(&admin, &resource, "b", next.fence()).await);
    proxy.frozen.send_replace(false);
    assert!(
        !fenced_write(&admin, &resource, "a, late", old_fence).await,
        "the stale holder's write is refused"
    );
    next.release().await.unwrap();
    assert!(matches!(held.release().await, Err(Error::Lost)));
}
