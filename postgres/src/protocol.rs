//! The protocol on the server: the statements `PgLocks` sends, in one
//! place, so that a service in another language can take the same locks.
//!
//! - **The advisory key** of a key string is `hashtextextended(key, 0)`,
//!   PostgreSQL's own stable 64-bit hash of text (PostgreSQL 11 and
//!   later), computed by the server. Another client takes the same lock
//!   with `SELECT pg_advisory_lock(hashtextextended('my-key', 0))`. Two
//!   keys with the same hash exclude each other across sessions (a
//!   collision only over-excludes); fencing tokens are per full key.
//!   PostgreSQL text cannot hold a NUL character: a key that contains one
//!   is sent with each NUL written as the two characters `\0` (see
//!   [`server_key`]), and so shares its lock and counter with the key
//!   spelled that way, which only over-excludes.
//! - **Acquire** ([`TRY_LOCK`]): one statement, one round trip. It tries
//!   the session-level advisory lock without waiting and, only if it got
//!   it, issues the key's next fencing token: `(epoch << 40) + counter`,
//!   where the counter is the key's row in the `UNLOGGED` table
//!   `toctou_fence_count` (no WAL flush, so no `fsync` per acquisition) and
//!   the epoch is the durable row of `toctou_epoch`. A marker row in the
//!   counters' table names the epoch they belong to; crash recovery empties
//!   the table, marker included, and the next acquisition then starts a new
//!   epoch ([`NEW_EPOCH`]), which puts every later token above every
//!   earlier one. The counter's row is found by the SHA-256 digest of the
//!   full key (a B-tree cannot index text over about 2.7 kB), and keeps the
//!   key beside it. A session-level lock survives the statement's
//!   transaction, so a statement that takes the lock and then fails leaves
//!   it held: the client then ends the session, which frees it.
//! - **Waiting** ([`REGISTER`]): a process that failed its try holds the
//!   key's *waiting key* (`hashtextextended(key, 1)`) shared while it
//!   waits, and tries once more after registering.
//! - **Release** ([`UNLOCK`]): unlocks and, if some process is registered
//!   as waiting, sends `NOTIFY toctou_release` with the advisory key as
//!   the payload, in one statement. Waiting processes `LISTEN` on that
//!   channel and try again when their key's hash is announced; they also
//!   retry on a timer, for holders whose
//!   session ended without a release (the server frees their locks, but
//!   nobody notifies).
//! - **Session settings** ([`session_settings`]): the server-side TCP
//!   keepalive and `tcp_user_timeout` of the holding session, so that the
//!   server ends a partitioned client's session, and frees its locks,
//!   within a bound.

use std::borrow::Cow;
use std::time::Duration;

/// The text sent to the server for `key`: `key` itself, unless it contains
/// a NUL character, which PostgreSQL text cannot hold; each NUL is then
/// written as `\0`.
pub fn server_key(key: &str) -> Cow<'_, str> {
    if key.contains('\0') {
        Cow::Owned(key.replace('\0', "\\0"))
    } else {
        Cow::Borrowed(key)
    }
}

/// The `LISTEN`/`NOTIFY` channel on which releases are announced.
pub const CHANNEL: &str = "toctou_release";

/// How many bits of a fencing token the per-key counter takes; the epoch
/// takes the bits above (so up to 2^23 server starts, and 2^40
/// acquisitions of one key between two starts).
pub const COUNTER_BITS: u32 = 40;

/// Whether the fencing tables exist (then [`SETUP`], which needs the
/// `CREATE` privilege on the schema, is skipped).
pub const HAS_TABLES: &str = "SELECT to_regclass('toctou_epoch') IS NOT NULL \
     AND to_regclass('toctou_fence_count') IS NOT NULL";

/// Creates the fencing tables if they are missing. Serialised by a
/// transaction-level advisory lock: concurrent `CREATE TABLE IF NOT
/// EXISTS` statements can otherwise fail on the catalog's unique index.
///
/// - `toctou_epoch` (logged: durable): one row, the current epoch.
/// - `toctou_fence_count` (`UNLOGGED`): the per-key counters, and a
///   *marker* row (the empty digest) holding the epoch they belong to.
///   Only [`NEW_EPOCH`] writes the marker, in the transaction that moves
///   the durable epoch to the same value: a marker that exists names an
///   epoch that is durably the current one, so an acquisition reads the
///   marker alone (one look-up in the table it writes anyway).
///   Writing a counter does not wait for a WAL flush, so issuing a token
///   costs no `fsync`. Crash recovery empties the table (whether the whole
///   server restarted or only its backends were reset after one crashed),
///   and a promoted standby starts with it empty: the marker is then gone,
///   which is how the next acquisition knows to start a new epoch.
pub const SETUP: &str = "BEGIN; \
     SELECT pg_advisory_xact_lock(hashtextextended('toctou fencing tables', 0)); \
     CREATE TABLE IF NOT EXISTS toctou_epoch ( \
         id int PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL); \
     INSERT INTO toctou_epoch VALUES (1, 0) ON CONFLICT (id) DO NOTHING; \
     CREATE UNLOGGED TABLE IF NOT EXISTS toctou_fence_count ( \
         digest bytea PRIMARY KEY, key text NOT NULL, token bigint NOT NULL); \
     COMMIT";

/// Tries the lock of `$1` (a key) and, if taken, issues its next fencing
/// token. Returns one row: the advisory key (`bigint`), whether the lock
/// was taken (`bool`), the token (`bigint`; `NULL` if not taken, or if
/// the counters do not belong to the current epoch: then [`NEW_EPOCH`] and
/// [`FENCE`] follow, under the lock), and the key's *waiting* key
/// (`hashtextextended($1, 1)`, see [`REGISTER`]).
///
/// The token is `(epoch << 40) + counter`. The data-modifying CTE runs
/// exactly once and only inserts when `l.ok` and the epoch is current; `l`
/// is referenced twice and calls a volatile function, so the server
/// evaluates it once.
pub const TRY_LOCK: &str = concat!(
    "WITH l AS ( \
         SELECT h.k, pg_try_advisory_lock(h.k) AS ok \
         FROM (SELECT hashtextextended($1, 0) AS k) AS h \
     ), e AS (",
    "SELECT m.token AS epoch FROM toctou_fence_count m WHERE m.digest = '\\x'::bytea",
    "), f AS ( \
         INSERT INTO toctou_fence_count AS t (digest, key, token) \
         SELECT sha256(convert_to($1, 'UTF8')), $1, 1 FROM l, e WHERE l.ok \
         ON CONFLICT (digest) DO UPDATE SET token = t.token + 1 \
         RETURNING t.token \
     ) \
     SELECT l.k, l.ok, (SELECT (e.epoch << 40) + f.token FROM e, f), \
         hashtextextended($1, 1) FROM l"
);

/// Starts a new epoch if the counters do not belong to the current one: in
/// one transaction, under the epoch row's lock, moves the durable epoch up
/// and writes the marker of the new one. The epoch's commit is durable
/// (the session runs with `synchronous_commit = on`) before any token of
/// it is issued. A concurrent starter waits for the row lock, then finds
/// the marker current and changes nothing.
pub const NEW_EPOCH: &str = "BEGIN; \
     SELECT epoch FROM toctou_epoch WHERE id = 1 FOR UPDATE; \
     UPDATE toctou_epoch SET epoch = epoch + 1 WHERE id = 1 AND NOT EXISTS ( \
         SELECT 1 FROM toctou_fence_count m \
         WHERE m.digest = '\\x'::bytea AND m.token = toctou_epoch.epoch); \
     INSERT INTO toctou_fence_count (digest, key, token) \
         SELECT '\\x'::bytea, '', epoch FROM toctou_epoch WHERE id = 1 \
         ON CONFLICT (digest) DO UPDATE SET token = EXCLUDED.token; \
     COMMIT";

/// The next fencing token of `$1`, for a holder whose [`TRY_LOCK`] found
/// the counters stale (run after [`NEW_EPOCH`]).
pub const FENCE: &str = concat!(
    "WITH e AS (",
    "SELECT m.token AS epoch FROM toctou_fence_count m WHERE m.digest = '\\x'::bytea",
    "), f AS ( \
         INSERT INTO toctou_fence_count AS t (digest, key, token) \
         SELECT sha256(convert_to($1, 'UTF8')), $1, 1 FROM e \
         ON CONFLICT (digest) DO UPDATE SET token = t.token + 1 \
         RETURNING t.token \
     ) \
     SELECT (e.epoch << 40) + f.token FROM e, f"
);

/// Releases the lock of the advisory key `$1` (`bigint`) and, if some
/// process waits for it (holds its waiting key `$2` shared, see
/// [`REGISTER`]), announces the release. Returns whether the session held
/// the lock.
///
/// The check comes after the unlock, in the same statement: a waiter that
/// registers after the check tries again after registering, and finds the
/// key free. `pg_try_advisory_xact_lock` fails while anybody holds the
/// waiting key shared, and is released with the statement.
pub const UNLOCK: &str = "SELECT pg_advisory_unlock($1::bigint), \
     CASE WHEN pg_try_advisory_xact_lock($2::bigint) THEN false \
     ELSE (SELECT true FROM (SELECT pg_notify('toctou_release', $1::bigint::text)) AS n) END";

/// Registers the session as waiting for the key `$1`: takes its waiting
/// key (`hashtextextended($1, 1)`) shared, without waiting. Returns whether
/// it did (not while a release is checking it, for the length of one
/// statement) and the waiting key. Releases announce only keys somebody
/// waits for, which saves a release nobody waits for the `NOTIFY`.
pub const REGISTER: &str =
    "SELECT pg_try_advisory_lock_shared(hashtextextended($1, 1)), hashtextextended($1, 1)";

/// Ends a [`REGISTER`]: `$1` is the waiting key.
pub const UNREGISTER: &str = "SELECT pg_advisory_unlock_shared($1::bigint)";

/// The server session's process id: the same in every statement of a
/// direct connection, different between statements behind a pooler in
/// transaction mode.
pub const BACKEND: &str = "SELECT pg_backend_pid()";

/// The heartbeat: an empty statement, one round trip.
pub const HEARTBEAT: &str = "";

/// The holding session's server-side settings for `bound`: the server ends
/// the session (and frees its locks) once the client has been unreachable
/// for about `bound`. An idle link: keepalive probes start after half the
/// bound and two unanswered probes, a quarter apart, end it. Data in
/// flight that the client does not acknowledge: `tcp_user_timeout`.
pub fn session_settings(bound: Duration) -> String {
    let secs = bound.as_secs().max(2);
    let idle = (secs / 2).max(1);
    let interval = (secs / 4).max(1);
    format!(
        "SET tcp_keepalives_idle = {idle}; \
         SET tcp_keepalives_interval = {interval}; \
         SET tcp_keepalives_count = 2; \
         SET tcp_user_timeout = {}; \
         SET synchronous_commit = on; \
         SET default_transaction_isolation = 'read committed'",
        bound.as_millis().max(2000)
    )
}

/// What the waiting protocol needs from the server side: the real
/// connections implement it (`locks.rs`), and so does the loom models'
/// simulated server (`postgres/loom-tests/protocol.rs`).
pub trait Contact {
    /// A failure to talk to the server.
    type Error;
    /// What the caller keeps of a successful try (the real session).
    type Taken;
    /// A subscription to release announcements.
    type Subscription;
    /// A registration as a waiter of a key, ended when dropped.
    type Registration;
    /// Starts receiving release announcements.
    fn subscribe(&self) -> Self::Subscription;
    /// One try of `key` ([`TRY_LOCK`]).
    fn try_lock(
        &self,
        key: &str,
    ) -> impl std::future::Future<Output = Result<Attempt<Self::Taken>, Self::Error>>;
    /// Registers as a waiter of `key` ([`REGISTER`]): releases of a key
    /// are announced only while somebody is registered. `None` if a release
    /// of the key was checking for waiters at that moment (it has unlocked:
    /// try again).
    fn register(
        &self,
        key: &str,
    ) -> impl std::future::Future<Output = Result<Option<Self::Registration>, Self::Error>>;
    /// A try failed: the waits that follow, until the next try, share one
    /// retry timer (announcements of other keys must not push it back).
    fn tried(&self, subscription: &mut Self::Subscription) {
        let _ = subscription;
    }
    /// Waits for the next event: an announcement, a lost stretch of them,
    /// the retry timer, or the caller's deadline.
    fn wait(
        &self,
        subscription: &mut Self::Subscription,
    ) -> impl std::future::Future<Output = Event>;
}

/// The outcome of one try.
pub struct Attempt<T> {
    /// The key's advisory key.
    pub advisory: i64,
    /// The fencing token and what the caller keeps, if the lock was taken.
    pub taken: Option<(i64, T)>,
}

/// What ended a wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A release of this advisory key was announced.
    Announced(i64),
    /// Announcements may have been missed (the listener reconnected, or
    /// the subscription lagged): any key may have been released.
    Missed,
    /// The retry timer: for holders whose session ended without a release.
    Timer,
    /// The caller's deadline passed.
    Deadline,
}

/// The server half of an acquisition, once the in-process key is held:
/// tries `key` until the lock is taken (the advisory key, the fencing token
/// and what [`Contact::Taken`] keeps), or, without `patient`, after one try,
/// or when the deadline passes (`None`).
///
/// The waiter subscribes to announcements *before* its first try, and
/// after a failed try registers as a waiter of the key and tries once
/// more before it waits: a release announces (after its unlock) only while
/// a waiter is registered, so a release that the last try did not see is
/// announced to this subscription. A wait ends only on an
/// announcement of this key (others are skipped), a possible loss of
/// announcements, the timer or the deadline; every end but the deadline
/// leads to another try.
pub async fn acquire<C: Contact>(
    contact: &C,
    key: &str,
    patient: bool,
) -> Result<Option<(i64, i64, C::Taken)>, C::Error> {
    let mut subscription = contact.subscribe();
    // Dropped on every way out, cancellation included.
    let mut registration = None;
    loop {
        let attempt = contact.try_lock(key).await?;
        if let Some((token, taken)) = attempt.taken {
            return Ok(Some((attempt.advisory, token, taken)));
        }
        if !patient {
            return Ok(None);
        }
        if registration.is_none() {
            // Releases are announced only to registered waiters: one that
            // came between the failed try and the registration was not,
            // so try again before waiting.
            registration = contact.register(key).await?;
            continue;
        }
        contact.tried(&mut subscription);
        loop {
            match contact.wait(&mut subscription).await {
                Event::Announced(other) if other != attempt.advisory => continue,
                Event::Announced(_) | Event::Missed | Event::Timer => break,
                Event::Deadline => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_with_nul_are_rewritten() {
        assert!(matches!(server_key("wf-1"), Cow::Borrowed("wf-1")));
        assert_eq!(server_key("a\0b"), "a\\0b");
    }

    #[test]
    fn the_default_bound_gives_a_server_side_end_within_it() {
        let s = session_settings(Duration::from_secs(4));
        assert!(s.contains("tcp_keepalives_idle = 2"), "{s}");
        assert!(s.contains("tcp_keepalives_interval = 1"), "{s}");
        assert!(s.contains("tcp_keepalives_count = 2"), "{s}");
        assert!(s.contains("tcp_user_timeout = 4000"), "{s}");
    }
}
