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
//!   it, increments the key's durable fencing counter in `toctou_fence`
//!   (created on first use), returning the new token. The counter's row is
//!   found by the SHA-256 digest of the full key (a B-tree cannot index
//!   text over about 2.7 kB), and keeps the key beside it. A session-level
//!   lock survives the statement's transaction, so a statement that takes
//!   the lock and then fails leaves it held: the client unlocks it.
//! - **Release** ([`UNLOCK`]): unlocks and sends `NOTIFY toctou_release`
//!   with the advisory key as the payload, in one statement. Waiting
//!   processes `LISTEN` on that channel and try again when their key's
//!   hash is announced; they also retry on a timer, for holders whose
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

/// Creates the fencing table if it is missing. Serialised by a
/// transaction-level advisory lock: concurrent `CREATE TABLE IF NOT
/// EXISTS` statements can otherwise fail on the catalog's unique index.
pub const SETUP: &str = "BEGIN; \
     SELECT pg_advisory_xact_lock(hashtextextended('toctou_fence table', 0)); \
     CREATE TABLE IF NOT EXISTS toctou_fence ( \
         digest bytea PRIMARY KEY, key text NOT NULL, token bigint NOT NULL); \
     COMMIT";

/// Tries the lock of `$1` (a key) and, if taken, issues its next fencing
/// token. Returns one row: the advisory key (`bigint`), whether the lock
/// was taken (`bool`), and the token (`bigint`, `NULL` if not taken).
///
/// The data-modifying CTE runs exactly once and only inserts when `l.ok`;
/// `l` is referenced twice and calls a volatile function, so the server
/// evaluates it once.
pub const TRY_LOCK: &str = "WITH l AS ( \
         SELECT h.k, pg_try_advisory_lock(h.k) AS ok \
         FROM (SELECT hashtextextended($1, 0) AS k) AS h \
     ), f AS ( \
         INSERT INTO toctou_fence AS t (digest, key, token) \
         SELECT sha256(convert_to($1, 'UTF8')), $1, 1 FROM l WHERE l.ok \
         ON CONFLICT (digest) DO UPDATE SET token = t.token + 1 \
         RETURNING t.token \
     ) \
     SELECT l.k, l.ok, (SELECT token FROM f) FROM l";

/// Releases the lock of the advisory key `$1` (`bigint`) and announces it.
/// Returns whether the session held it.
pub const UNLOCK: &str =
    "SELECT pg_advisory_unlock($1::bigint), pg_notify('toctou_release', $1::bigint::text)";

/// Releases the lock of the advisory key `$1` without announcing it: after
/// a [`TRY_LOCK`] that took the lock and then failed, or whose caller went
/// away (nobody can be waiting for a release that never was).
pub const UNLOCK_QUIETLY: &str = "SELECT pg_advisory_unlock($1::bigint)";

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
         SET tcp_user_timeout = {}",
        secs * 1000
    )
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
