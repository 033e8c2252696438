//! Replicas of one service, as separate processes on this machine, against
//! the local PostgreSQL server: the incident write-ups' races between
//! replicas, naive (check, then act, in separate statements) against
//! `toctou-postgres`.
//!
//! ```text
//! cargo run -p toctou-postgres --example replicas            # 4 replicas
//! TOCTOU_PG_URL=postgres://user@host/db cargo run -p toctou-postgres --example replicas -- 8
//! ```
//!
//! Each replica process, at the same moment as the others:
//! - elects the cleanup leader: naive, "is there a leader row? no: I lead";
//!   with `toctou-postgres`, `try_lock("cleanup-leader")` (singleton
//!   cleanup thread);
//! - ensures one model server per model: naive, "is it running? no: start
//!   it"; with `toctou-postgres`, the same check under `lock(model)`;
//! - emits 20 sequence numbers for each of 3 workflows: naive, `max + 1`;
//!   with `toctou-postgres`, the same under `lock(workflow)`.
//!
//! Then the leader's session is terminated on the server: its guard
//! reports the loss, a new leader takes over with a larger fencing token,
//! and the old leader's late write, carrying its old token, is refused.
//!
//! Without a server it says how to point it at one, and exits 0. It exits
//! 1 if a `toctou-postgres` row shows a race.

use std::process::{Command, Stdio};
use std::time::Duration;

use toctou_postgres::PgLocks;
use tokio_postgres::{Client, NoTls};

const ROLE: &str = "TOCTOU_REPLICA";
const RUN: &str = "TOCTOU_REPLICA_RUN";
const MODELS: [&str; 2] = ["llama", "mistral"];
const WORKFLOWS: usize = 3;
const EMITS: usize = 20;

fn url() -> String {
    std::env::var("TOCTOU_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn admin() -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&url(), NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[tokio::main]
async fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        let run = std::env::var(RUN).unwrap();
        replica(&role, &run).await;
        return;
    }
    let replicas: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);
    let db = match tokio::time::timeout(Duration::from_secs(5), admin()).await {
        Ok(Ok(db)) => db,
        other => {
            let why = match other {
                Ok(Err(e)) => toctou_postgres::Error::Connect(e).to_string(),
                _ => "no answer within 5 s".to_owned(),
            };
            println!(
                "No PostgreSQL server at {} ({why}).\n\
                 Point the example at one with TOCTOU_PG_URL=postgres://user@host:port/db \
                 (the user needs CREATE TABLE and pg_terminate_backend on its own sessions).",
                url()
            );
            return;
        }
    };
    let run = format!("{}-{}", std::process::id(), rand_suffix());
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS replicas_leader (run text, mode text, replica int); \
         CREATE TABLE IF NOT EXISTS replicas_server (run text, mode text, model text); \
         CREATE TABLE IF NOT EXISTS replicas_seq (run text, mode text, workflow int, seq bigint); \
         CREATE TABLE IF NOT EXISTS replicas_fenced (run text PRIMARY KEY, writer text, fence bigint)",
    )
    .await
    .unwrap();
    println!("{replicas} replica processes against {}\n", url());
    println!("| race | naive (check, then act) | toctou-postgres |");
    println!("|---|---:|---:|");
    let mut clean = true;
    for mode in ["naive", "toctou"] {
        let children: Vec<_> = (0..replicas)
            .map(|i| {
                Command::new(std::env::current_exe().unwrap())
                    .env(ROLE, format!("{mode}:{i}"))
                    .env(RUN, &run)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start a replica")
            })
            .collect();
        for mut child in children {
            assert!(child.wait().unwrap().success(), "a replica failed");
        }
    }
    let count = |sql: &'static str, mode: &'static str| {
        let (db, run) = (&db, run.clone());
        async move {
            db.query_one(sql, &[&run, &mode])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let leaders = "SELECT count(*) FROM replicas_leader WHERE run = $1 AND mode = $2";
    let starts = "SELECT count(*) FROM replicas_server WHERE run = $1 AND mode = $2";
    let duplicates = "SELECT count(*) - count(DISTINCT (workflow, seq)) FROM replicas_seq \
                      WHERE run = $1 AND mode = $2";
    let rows = [
        ("cleanup leaders elected (want 1)", leaders, 1),
        ("model servers started for 2 models (want 2)", starts, 2),
        ("duplicate sequence numbers (want 0)", duplicates, 0),
    ];
    for (what, sql, want) in rows {
        let naive = count(sql, "naive").await;
        let ours = count(sql, "toctou").await;
        clean &= ours == want;
        println!("| {what} | {naive} | {ours} |");
    }
    println!();
    clean &= failover(&db, &run).await;
    if !clean {
        println!("\nA toctou-postgres row shows a race.");
        std::process::exit(1);
    }
}

/// One replica process: the three races, in `mode`.
async fn replica(role: &str, run: &str) {
    let (mode, index) = role.split_once(':').unwrap();
    let index: i32 = index.parse().unwrap();
    let db = admin().await.unwrap();
    let locks = PgLocks::connect(&url()).await.unwrap();
    let naive = mode == "naive";
    // The cleanup leader.
    if naive {
        let leader: i64 = db
            .query_one(
                "SELECT count(*) FROM replicas_leader WHERE run = $1 AND mode = $2",
                &[&run, &mode],
            )
            .await
            .unwrap()
            .get(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        if leader == 0 {
            db.execute(
                "INSERT INTO replicas_leader VALUES ($1, $2, $3)",
                &[&run, &mode, &index],
            )
            .await
            .unwrap();
        }
    } else if let Some(guard) = locks
        .try_lock(&format!("{run}-cleanup-leader"))
        .await
        .unwrap()
    {
        db.execute(
            "INSERT INTO replicas_leader VALUES ($1, $2, $3)",
            &[&run, &mode, &index],
        )
        .await
        .unwrap();
        // The leader keeps leading for the rest of the run.
        tokio::time::sleep(Duration::from_millis(300)).await;
        guard.release().await.unwrap();
    }
    // One model server per model.
    for model in MODELS {
        let guard = if naive {
            None
        } else {
            Some(locks.lock(&format!("{run}-model-{model}")).await.unwrap())
        };
        let running: i64 = db
            .query_one(
                "SELECT count(*) FROM replicas_server WHERE run = $1 AND mode = $2 AND model = $3",
                &[&run, &mode, &model],
            )
            .await
            .unwrap()
            .get(0);
        tokio::time::sleep(Duration::from_millis(10)).await; // starting takes a while
        if running == 0 {
            db.execute(
                "INSERT INTO replicas_server VALUES ($1, $2, $3)",
                &[&run, &mode, &model],
            )
            .await
            .unwrap();
        }
        if let Some(guard) = guard {
            guard.release().await.unwrap();
        }
    }
    // Per-workflow sequence numbers.
    for i in 0..EMITS * WORKFLOWS {
        let workflow = (i % WORKFLOWS) as i32;
        let guard = if naive {
            None
        } else {
            Some(
                locks
                    .lock(&format!("{run}-workflow-{workflow}"))
                    .await
                    .unwrap(),
            )
        };
        let max: Option<i64> = db
            .query_one(
                "SELECT max(seq) FROM replicas_seq WHERE run = $1 AND mode = $2 AND workflow = $3",
                &[&run, &mode, &workflow],
            )
            .await
            .unwrap()
            .get(0);
        db.execute(
            "INSERT INTO replicas_seq VALUES ($1, $2, $3, $4)",
            &[&run, &mode, &workflow, &(max.unwrap_or(0) + 1)],
        )
        .await
        .unwrap();
        if let Some(guard) = guard {
            guard.release().await.unwrap();
        }
    }
}

/// The leader's session is terminated: it learns of the loss, a new leader
/// takes over with a larger token, and the old leader's late write is
/// refused by the fenced resource. Returns whether all of that held.
async fn failover(db: &Client, run: &str) -> bool {
    let key = format!("{run}-failover-leader");
    let old = PgLocks::connect(&url()).await.unwrap();
    let new = PgLocks::connect(&url()).await.unwrap();
    db.execute("INSERT INTO replicas_fenced VALUES ($1, NULL, 0)", &[&run])
        .await
        .unwrap();
    // The fenced resource: a write carries its token and is refused if a
    // larger one was accepted before.
    let write = |writer: &'static str, fence: i64| async move {
        db.execute(
            "UPDATE replicas_fenced SET writer = $1, fence = $2 WHERE run = $3 AND fence <= $2",
            &[&writer, &fence, &run],
        )
        .await
        .unwrap()
            == 1
    };
    let leading = old.lock(&key).await.unwrap();
    let old_fence = leading.fence();
    println!("leader A holds `{key}` with fencing token {old_fence}");
    let pid: i32 = db
        .query_one(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
             AND ((classid::bigint << 32) | objid::bigint) = $1",
            &[&leading.advisory_key()],
        )
        .await
        .unwrap()
        .get(0);
    let lost = leading.lost();
    db.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let noticed = tokio::time::timeout(Duration::from_secs(5), lost)
        .await
        .is_ok();
    println!(
        "A's session was terminated on the server: A {} (is_held() = {})",
        if noticed {
            "noticed at once"
        } else {
            "did NOT notice"
        },
        leading.is_held()
    );
    let taking_over = new.lock(&key).await.unwrap();
    let new_fence = taking_over.fence();
    println!("leader B takes over with fencing token {new_fence}");
    let b_wrote = write("B", new_fence).await;
    let a_refused = !write("A, late", old_fence).await;
    println!(
        "B's write with token {new_fence}: {}; A's late write with token {old_fence}: {}",
        if b_wrote { "accepted" } else { "REFUSED" },
        if a_refused { "refused" } else { "ACCEPTED" }
    );
    let released_lost = leading.release().await.is_err();
    taking_over.release().await.unwrap();
    noticed && new_fence > old_fence && b_wrote && a_refused && released_lost
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}
