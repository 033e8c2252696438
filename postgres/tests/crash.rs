//! A real crash of the server: one backend killed with `SIGKILL` makes the
//! postmaster reset every backend and run crash recovery, which empties
//! unlogged tables, while its own start time stays the same. Fencing
//! tokens must still go up. In a test binary of its own, so that no other
//! test's connections are cut.
//!
//! Skipped, with the reason printed, where no server answers or its
//! backends cannot be signalled (another user's processes, another
//! machine); under `CI=true` a missing server fails it.

use std::time::Duration;

use toctou_postgres::PgLocks;
use tokio_postgres::NoTls;

fn url() -> String {
    std::env::var("TOCTOU_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn connect() -> Option<tokio_postgres::Client> {
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&url(), NoTls),
    )
    .await
    {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Some(client)
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_keep_increasing_across_a_crash_of_the_server() {
    let Some(admin) = connect().await else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("no PostgreSQL at {} under CI=true", url());
        }
        eprintln!("SKIPPED: no PostgreSQL at {}", url());
        return;
    };
    let key = format!("crash-{}", std::process::id());
    let locks = PgLocks::connect(&url()).await.unwrap();
    let guard = locks.lock(&key).await.unwrap();
    let before = guard.fence();
    let lost = guard.lost();
    let victim: i32 = admin
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let killed = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status();
    if !matches!(killed, Ok(status) if status.success()) {
        eprintln!("SKIPPED: cannot signal the server's backend {victim} (not local, or not ours)");
        guard.release().await.unwrap();
        return;
    }
    // Every session ends in the reset: the holder learns of it.
    tokio::time::timeout(Duration::from_secs(5), lost)
        .await
        .expect("the holder learns that its session ended");
    assert!(!guard.is_held());
    assert!(
        guard.release().await.is_err(),
        "the release reports the loss"
    );
    // Wait for the server to accept connections again, then lock anew.
    let mut after = None;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(Ok(again)) = tokio::time::timeout(Duration::from_secs(5), locks.lock(&key)).await
        {
            after = Some(again);
            break;
        }
    }
    let again = after.expect("the server came back within 30 s");
    println!("fence {before} before the crash, {} after", again.fence());
    assert!(
        again.fence() > before,
        "a token went down or repeated after a crash"
    );
    assert!(again.fence() >> 40 > before >> 40, "a new epoch");
    again.release().await.unwrap();
}
