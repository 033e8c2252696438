//! The crate's error type.

use std::fmt;

/// What went wrong with a lock operation.
///
/// Every failure of the server, the network or the session is an `Error`,
/// never a panic. [`Error::is_lost`] tells a lock that may have been lost
/// (the holder must stop acting on it) from a failure to talk to the server.
///
/// ```
/// # fn demo(e: toctou_postgres::Error) {
/// if e.is_lost() {
///     // stop writing: another holder may already have the key
/// }
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Connecting to the server failed (unreachable, refused, wrong
    /// credentials, an invalid URL).
    Connect(tokio_postgres::Error),
    /// A statement failed, or the session's connection broke while it ran.
    Query(tokio_postgres::Error),
    /// A statement did not answer within its bound (the heartbeat timeout):
    /// the server or the network is unresponsive.
    Timeout,
    /// The lock may have been lost: the session that held it ended (the
    /// backend was terminated, the server restarted, the connection broke
    /// or stopped answering heartbeats), or the server no longer held it on
    /// release.
    Lost,
    /// The connection goes through a pooler in transaction mode (such as
    /// PgBouncer's `pool_mode = transaction`): consecutive statements ran in
    /// different server sessions, and session-level advisory locks cannot
    /// work there. Connect directly, or through session pooling.
    Pooled,
    /// No tokio runtime is running, or it was built without its timer:
    /// `PgLocks` spawns its connection and heartbeat tasks on the caller's
    /// runtime, which needs IO and time enabled (`enable_all`).
    NoRuntime,
}

impl Error {
    /// Whether the lock may have been lost: stop acting on it.
    ///
    /// ```
    /// assert!(toctou_postgres::Error::Lost.is_lost());
    /// assert!(!toctou_postgres::Error::Timeout.is_lost());
    /// ```
    pub fn is_lost(&self) -> bool {
        matches!(self, Error::Lost)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(e) => {
                write!(f, "toctou-postgres: cannot connect to the server: {e}")?;
                causes(f, e)
            }
            Error::Query(e) => {
                write!(f, "toctou-postgres: a statement failed: {e}")?;
                causes(f, e)
            }
            Error::Timeout => write!(
                f,
                "toctou-postgres: the server did not answer within the heartbeat timeout"
            ),
            Error::Lost => write!(
                f,
                "toctou-postgres: the lock may have been lost (its session ended or the server \
                 no longer held it); stop acting on it"
            ),
            Error::Pooled => write!(
                f,
                "toctou-postgres: consecutive statements ran in different server sessions (a \
                 pooler in transaction mode?); session-level advisory locks need a direct \
                 connection or session pooling"
            ),
            Error::NoRuntime => write!(
                f,
                "toctou-postgres: no tokio runtime with IO and time enabled is running (PgLocks \
                 spawns its connection tasks on the caller's runtime)"
            ),
        }
    }
}

/// Appends the error's causes (tokio-postgres's own message is terse:
/// "error connecting to server", with the reason in its source).
fn causes(f: &mut fmt::Formatter<'_>, e: &tokio_postgres::Error) -> fmt::Result {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        write!(f, ": {c}")?;
        cause = c.source();
    }
    Ok(())
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect(e) | Error::Query(e) => Some(e),
            _ => None,
        }
    }
}
