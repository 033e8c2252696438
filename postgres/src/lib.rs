//! Keyed locks across processes and machines on PostgreSQL advisory locks,
//! with fencing tokens and lost-lock detection: the `toctou` answer to
//! check-then-act races between replicas (two replicas running "the"
//! cleanup job, starting the same model server, or emitting the same
//! per-workflow sequence number).
//!
//! ```no_run
//! # async fn demo() -> Result<(), toctou_postgres::Error> {
//! let locks = toctou_postgres::PgLocks::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let guard = locks.lock("workflow-7").await?;
//! tokio::select! {
//!     _ = guard.lost() => { /* stop: another replica may hold the key now */ }
//!     _ = async { /* work, passing guard.fence() with every write */ } => {}
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! # When to use it
//!
//! Use [`toctou::KeyedLocks`] within a process and [`toctou::FileLocks`]
//! between processes of one machine. Use `toctou-postgres` when the parties
//! run on several machines and already share a PostgreSQL server.
//!
//! # Semantics
//!
//! - **Keys** are any string. The server locks `hashtextextended(key, 0)`
//!   (PostgreSQL's stable 64-bit hash of text), so a service in another
//!   language takes the same lock with
//!   `SELECT pg_advisory_lock(hashtextextended('my-key', 0))`. Two keys
//!   whose hashes collide exclude each other across processes (a collision
//!   only over-excludes); within one process the in-process queue tells
//!   them apart (its one session holds the advisory key once per holder).
//!   Fencing tokens are kept per full key string.
//! - **Fencing tokens.** Each acquisition issues the key's next token in
//!   the same statement that takes the lock: [`PgGuard::fence`] is strictly
//!   larger than every earlier token of the key, across processes,
//!   machines and server restarts. It is `(epoch << 40) + counter`: the
//!   per-key counter lives in an `UNLOGGED` table (so issuing a token adds
//!   no `fsync` to the lock's round trip), and the epoch, a durable row,
//!   moves up once at every start of the server, so the counters that a
//!   crash empties start over above every earlier token. A resource that
//!   must not accept a stale holder's late write keeps the
//!   largest token it accepted and refuses smaller ones:
//!
//!   ```sql
//!   UPDATE account SET balance = $1, fence = $2
//!   WHERE id = $3 AND fence <= $2   -- 0 rows: refused, a newer holder wrote
//!   ```
//! - **Lost-lock detection.** A lock lives in its session on the server.
//!   The holding session is heartbeated (every 0.5 s by default); a
//!   heartbeat that fails or takes over 1.5 s, or a connection that
//!   breaks, declares the session lost: [`PgGuard::lost`] resolves and
//!   [`PgGuard::is_held`] turns false, within 2 s. The session is also set
//!   up so that the *server* ends it, and frees its locks, when the client
//!   has been unreachable for about 4 s (server-side TCP keepalives for an
//!   idle link, `tcp_user_timeout` for unacknowledged data): a
//!   *partitioned* client learns of the loss before anybody else can get
//!   the key. Where the server ends the session itself (an administrator's
//!   `pg_terminate_backend`, a crash or restart, `idle_session_timeout`),
//!   it frees the locks first, and the client learns within the same 2 s:
//!   in that window, and for writes already in flight, the fencing token
//!   is what refuses a stale holder. Both bounds are options
//!   ([`PgLocksBuilder`]).
//! - **What a frozen client looks like.** A process that is stopped (say,
//!   by a debugger or `SIGSTOP`) while its machine's TCP stack stays up
//!   keeps its locks: the server cannot tell it from a slow one, and its
//!   kernel answers the keepalives. When it resumes it learns of nothing
//!   until its next heartbeat; fence every write.
//! - **Connections.** Two per [`PgLocks`] (and its clones), whatever the
//!   number of keys held or tasks waiting: one session that holds every
//!   lock of the process (tries and releases are pipelined on it and never
//!   block it: waiting is `pg_try_advisory_lock`, not
//!   `pg_advisory_lock`), and one that `LISTEN`s for releases. Tasks of
//!   one process that wait for the same key queue in-process first (a
//!   [`toctou::KeyedLocks`]); only the one at the front talks to the
//!   server. It tries again when a release of its key is announced
//!   (`NOTIFY` from the releasing client) and every 0.5 s (for holders
//!   whose session ended without a release).
//! - **Cancellation.** Dropping a `lock` future leaves no lock on the
//!   server and no in-process waiter: a try in flight finishes in the
//!   background and releases what it took. Dropping a [`PgGuard`] releases
//!   in the background; [`PgGuard::release`] releases now and reports a
//!   lock that had been lost.
//! - **Errors**, never panics: [`Error`] tells an unreachable server, a
//!   failed statement, a timeout and a lost lock apart. A statement of the
//!   acquisition that fails after the server may have taken the lock ends
//!   the holding session (so the server frees it): this process's other
//!   locks are then reported lost too.
//!
//! # Compared with
//!
//! Each anchor's cell is taken from its own documentation (or, where
//! marked, its source).
//!
//! | | `toctou-postgres` | sqlx `PgAdvisoryLock` | `distributed-lock-postgres` 0.2 | Redlock (`rslock`) | etcd lock API |
//! |---|---|---|---|---|---|
//! | store | PostgreSQL advisory locks | PostgreSQL advisory locks | PostgreSQL advisory locks | Redis keys with a TTL, on a majority of N nodes | a key under a lease |
//! | lost lock | detected: `lost()` / `is_held()` within the heartbeat bound (2 s); a partitioned client learns before the server frees it (4 s) | not detected | a `lost` signal in the handle, not driven by a connection monitor (source) | the TTL expires; the holder must finish or extend in time | lease expiry; the client learns when its keep-alive fails |
//! | fencing token | yes, per key, durable | no | no | no | the lock key's revision can serve as one |
//! | connections | 2 per process, whatever the keys and waiters | one per held lock; a waiter blocks its connection in `pg_advisory_lock` | one pooled connection per held lock | – | one client, a lease per lock |
//! | waiting | in-process queue, then `pg_try_advisory_lock` + `NOTIFY` + a poll | `pg_advisory_lock` on the connection | blocking or polling, per its options | retries with a delay | server-side queue |
//! | release on drop | in the background, at once | queued until the connection is next used (documented) | when the connection is dropped or released | on TTL expiry | on lease revoke or expiry |
//! | cancellation | a dropped `lock` leaves no lock on the server | not documented | not documented | not documented | not documented |
//! | failover | locks lost (reported); tokens as durable as the counter's replication | locks lost | locks lost | a failover can grant the lock twice | locks survive (Raft) |
//!
//! # What is not promised
//!
//! - **Failover.** Advisory locks live only in the primary's memory. After
//!   a failover to a replica every lock is gone, and a new primary knows
//!   nothing of them; the sessions break, so every guard reports lost.
//!   Fencing tokens stay increasing across a failover only if the new
//!   primary has the old one's last epoch: the new primary starts a new
//!   epoch, but with asynchronous replication it may not have seen the
//!   old primary's last epoch bump, and then a token can repeat. Use
//!   synchronous replication if tokens must stay strictly increasing
//!   across failovers.
//! - **PgBouncer in transaction pooling mode** (or any pooler that hands a
//!   session to other clients between transactions) is not supported:
//!   session-level advisory locks would be held by, and released through,
//!   whichever client the pooler picked. Connect directly, or through
//!   session pooling. Detected where it shows: connecting fails with
//!   [`Error::Pooled`] if two statements of the setup ran in different
//!   server sessions (an idle pool may hand out the same one twice, so
//!   this catches a pooler often, not always).
//! - Fairness across processes: waiters retry on announcements and timers;
//!   no FIFO order is promised between processes.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod locks;
pub mod protocol;
mod session;

pub use error::Error;
pub use locks::{PgGuard, PgLocks, PgLocksBuilder};
