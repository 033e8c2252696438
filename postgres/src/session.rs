//! The I/O: the connections to the server, their driver tasks, the
//! heartbeat, and the listener that turns `NOTIFY` messages into wake-ups.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{broadcast, watch};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls, Socket, Statement};

use crate::Error;
use crate::protocol;

/// How long the locks' bounds are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// Between two heartbeats of a holding session.
    pub(crate) heartbeat: Duration,
    /// How long a heartbeat (or any statement) may take before the session
    /// is declared lost.
    pub(crate) timeout: Duration,
    /// How long the server keeps an unreachable client's session.
    pub(crate) server: Duration,
    /// Between two tries of a key held by another process, if no release
    /// is announced meanwhile.
    pub(crate) poll: Duration,
}

/// The session that holds this process's advisory locks: one connection,
/// on which every try, fence and release is pipelined. Its locks live and
/// die with it.
pub(crate) struct Session {
    pub(crate) client: Client,
    /// The protocol's statements, prepared on this session.
    pub(crate) statements: Statements,
    /// `true` once the session may have ended: its locks may be gone.
    lost: Arc<watch::Sender<bool>>,
}

/// The protocol's statements (see [`protocol`]), prepared on a session.
pub(crate) struct Statements {
    pub(crate) try_lock: Statement,
    pub(crate) unlock: Statement,
    pub(crate) fence: Statement,
    pub(crate) register: Statement,
    pub(crate) unregister: Statement,
}

impl Session {
    /// Connects, applies the server-side bounds, and starts the driver and
    /// the heartbeat on `runtime`.
    pub(crate) async fn open(
        config: &Config,
        bounds: Bounds,
        runtime: &Handle,
    ) -> Result<Arc<Session>, Error> {
        let (client, connection) = config.connect(NoTls).await.map_err(Error::Connect)?;
        let lost = Arc::new(watch::Sender::new(false));
        runtime.spawn(drive(connection, lost.clone(), None));
        let settings = protocol::session_settings(bounds.server);
        let setup = async {
            let before: i32 = client.query_one(protocol::BACKEND, &[]).await?.get(0);
            client.batch_execute(&settings).await?;
            // `CREATE TABLE IF NOT EXISTS` needs the `CREATE` privilege
            // even when the table exists: only run it when one is missing.
            let ready: bool = client.query_one(protocol::HAS_TABLES, &[]).await?.get(0);
            if !ready {
                client.batch_execute(protocol::SETUP).await?;
            }
            // Prepared once per session: each try and release is then one
            // round trip (an unprepared statement takes two).
            let statements = Statements {
                try_lock: client.prepare(protocol::TRY_LOCK).await?,
                unlock: client.prepare(protocol::UNLOCK).await?,
                fence: client.prepare(protocol::FENCE).await?,
                register: client.prepare(protocol::REGISTER).await?,
                unregister: client.prepare(protocol::UNREGISTER).await?,
            };
            let after: i32 = client.query_one(protocol::BACKEND, &[]).await?.get(0);
            Ok::<_, tokio_postgres::Error>((before == after, statements))
        };
        // The setup may create the fencing tables and wait for a concurrent
        // creator: a few heartbeat timeouts.
        let set_up = match tokio::time::timeout(bounds.timeout * 4, setup).await {
            Ok(Ok((true, statements))) => Ok(statements),
            // Two statements ran on two server sessions: a pooler in
            // transaction mode sits in between, and session-level locks
            // would be held by whichever client it picked.
            Ok(Ok((false, _))) => Err(Error::Pooled),
            Ok(Err(e)) => Err(Error::Query(e)),
            Err(_) => Err(Error::Timeout),
        };
        let statements = match set_up {
            Ok(statements) => statements,
            Err(e) => {
                // Closes the connection.
                lost.send_replace(true);
                return Err(e);
            }
        };
        let session = Arc::new(Session {
            client,
            statements,
            lost,
        });
        runtime.spawn(heartbeat(Arc::downgrade(&session), bounds));
        Ok(session)
    }

    /// Whether the session may have ended.
    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Declares the session lost and closes its connection (the driver
    /// drops it), so that the server ends the session and frees its locks
    /// as soon as it learns of the close.
    pub(crate) fn mark_lost(&self) {
        self.lost.send_replace(true);
    }

    /// Resolves once the session is lost.
    pub(crate) fn lost_signal(&self) -> watch::Receiver<bool> {
        self.lost.subscribe()
    }
}

/// Drives `connection` until it ends or the session is declared lost (then
/// drops it, closing the socket), forwarding `NOTIFY` payloads that parse as
/// advisory keys to `notify`. Marks the session lost when it ends.
async fn drive(
    mut connection: Connection<Socket, NoTlsStream>,
    lost: Arc<watch::Sender<bool>>,
    notify: Option<broadcast::Sender<i64>>,
) {
    let mut lost_rx = lost.subscribe();
    loop {
        tokio::select! {
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let (Some(tx), Ok(key)) = (&notify, n.payload().parse::<i64>()) {
                        // No receiver: nobody waits. Not an error.
                        let _ = tx.send(key);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            _ = until_true(&mut lost_rx) => break,
        }
    }
    drop(connection);
    lost.send_replace(true);
}

/// Sends an empty statement every `bounds.heartbeat`; one that fails or
/// takes longer than `bounds.timeout` ends the session (its locks may be
/// gone, or about to be). Stops when the session is dropped or lost.
async fn heartbeat(session: Weak<Session>, bounds: Bounds) {
    loop {
        let mut lost = match session.upgrade() {
            Some(s) => s.lost_signal(),
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(bounds.heartbeat) => {}
            _ = until_true(&mut lost) => return,
        }
        let Some(s) = session.upgrade() else {
            return;
        };
        let answered =
            tokio::time::timeout(bounds.timeout, s.client.simple_query(protocol::HEARTBEAT));
        if !matches!(answered.await, Ok(Ok(_))) {
            s.mark_lost();
            return;
        }
    }
}

/// Keeps one connection that `LISTEN`s for releases and forwards them to
/// `wakeups`, reconnecting (after a pause) when it breaks, until `stop`.
/// Without it, waiters still find released keys by polling.
pub(crate) async fn listen(
    config: Config,
    wakeups: broadcast::Sender<i64>,
    mut stop: watch::Receiver<bool>,
    bounds: Bounds,
) {
    loop {
        let connected = tokio::select! {
            c = config.connect(NoTls) => c,
            _ = until_true(&mut stop) => return,
        };
        if let Ok((client, connection)) = connected {
            let lost = Arc::new(watch::Sender::new(false));
            let driver = tokio::spawn(drive(connection, lost.clone(), Some(wakeups.clone())));
            let statement = format!("LISTEN {}", protocol::CHANNEL);
            let listening = tokio::time::timeout(bounds.timeout, client.batch_execute(&statement));
            if matches!(listening.await, Ok(Ok(()))) {
                // A release may have been announced while we were not
                // listening: wake every waiter once to try again.
                let _ = wakeups.send(WAKE_ALL);
                let mut ended = lost.subscribe();
                tokio::select! {
                    _ = until_true(&mut ended) => {}
                    _ = until_true(&mut stop) => {
                        lost.send_replace(true);
                        let _ = driver.await;
                        return;
                    }
                }
            }
            lost.send_replace(true);
            let _ = driver.await;
        }
        tokio::select! {
            _ = tokio::time::sleep(bounds.poll) => {}
            _ = until_true(&mut stop) => return,
        }
    }
}

/// A wake-up for every waiter, whatever its key.
pub(crate) const WAKE_ALL: i64 = i64::MIN;

/// Resolves once `flag` is `true` (or its sender is gone).
pub(crate) async fn until_true(flag: &mut watch::Receiver<bool>) {
    // The `Ref` that `wait_for` returns is dropped here, not held across a
    // caller's later await.
    let _ = flag.wait_for(|set| *set).await;
}
