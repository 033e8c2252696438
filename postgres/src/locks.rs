//! The public front-end: [`PgLocks`] and [`PgGuard`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use toctou::{KeyedLocks, OwnedKeyGuard};
use tokio::runtime::Handle;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_postgres::Config;

use crate::Error;
use crate::protocol;
use crate::session::{self, Bounds, Session};

/// Keyed locks across processes and machines, on PostgreSQL advisory
/// locks, with fencing tokens and lost-lock detection.
///
/// Cheap to clone (an `Arc` inside); every clone shares the connections.
/// See the [crate docs](crate) for the protocol, the bounds and what is
/// not promised.
///
/// ```no_run
/// # async fn demo() -> Result<(), toctou_postgres::Error> {
/// let locks = toctou_postgres::PgLocks::connect("postgres://postgres@127.0.0.1/test").await?;
/// let guard = locks.lock("invoice-42").await?;
/// // ... write, passing guard.fence() along so that a stale holder's
/// // late write is refused ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgLocks {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    bounds: Bounds,
    runtime: Handle,
    /// The session that holds the locks; replaced when it is lost.
    session: Mutex<Arc<Session>>,
    /// Serialises reconnections.
    reconnect: tokio::sync::Mutex<()>,
    /// The in-process queue: one task per key and process talks to the
    /// server.
    keyed: Arc<KeyedLocks<String>>,
    /// Releases announced by the server (advisory keys).
    wakeups: broadcast::Sender<i64>,
    /// Stops the listener when the last `PgLocks` clone is dropped.
    stop: watch::Sender<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Options for [`PgLocks`]: the bounds of lost-lock detection and of
/// waiting. Made by [`PgLocks::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), toctou_postgres::Error> {
/// use std::time::Duration;
/// let locks = toctou_postgres::PgLocks::builder()
///     .heartbeat(Duration::from_millis(250), Duration::from_millis(750))
///     .server_bound(Duration::from_secs(3))
///     .connect("postgres://postgres@127.0.0.1/test")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PgLocksBuilder {
    bounds: Bounds,
}

impl Default for PgLocksBuilder {
    fn default() -> Self {
        Self {
            bounds: Bounds {
                heartbeat: Duration::from_millis(500),
                timeout: Duration::from_millis(1500),
                server: Duration::from_secs(4),
                poll: Duration::from_millis(500),
            },
        }
    }
}

impl PgLocksBuilder {
    /// How often the holding session is heartbeated (default 0.5 s), and
    /// how long a heartbeat may take before the session is declared lost
    /// (default 1.5 s). A client learns of a loss within their sum.
    pub fn heartbeat(mut self, every: Duration, timeout: Duration) -> Self {
        self.bounds.heartbeat = every;
        self.bounds.timeout = timeout;
        self
    }

    /// How long the server keeps the session of a client it cannot reach
    /// (default 4 s, at least 2 s): the server-side TCP keepalive and
    /// `tcp_user_timeout` of the holding session. It is raised, if needed,
    /// to a second above the heartbeat's bound (every + timeout), so that a
    /// partitioned client learns of the loss before the server frees its
    /// locks.
    pub fn server_bound(mut self, bound: Duration) -> Self {
        self.bounds.server = bound.max(Duration::from_secs(2));
        self
    }

    /// How often a waiter tries a key again when no release is announced
    /// (default 0.5 s): this catches holders whose session ended without a
    /// release.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.bounds.poll = every;
        self
    }

    /// Connects with these options; see [`PgLocks::connect`].
    ///
    /// # Errors
    ///
    /// As [`PgLocks::connect`].
    pub async fn connect(self, url: &str) -> Result<PgLocks, Error> {
        let config: Config = url.parse().map_err(Error::Connect)?;
        self.connect_with(config).await
    }

    /// Connects with these options and a `tokio_postgres::Config`; see
    /// [`PgLocks::connect`].
    ///
    /// # Errors
    ///
    /// As [`PgLocks::connect`].
    pub async fn connect_with(self, mut config: Config) -> Result<PgLocks, Error> {
        let runtime = Handle::try_current().map_err(|_| Error::NoRuntime)?;
        // The heartbeats, polls and timeouts need the runtime's timer; a
        // runtime built without it would panic at the first one.
        let timer = std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO)));
        if timer.is_err() {
            return Err(Error::NoRuntime);
        }
        let mut bounds = self.bounds;
        // The client must learn of a loss before the server frees the
        // locks: keep the server's bound a second above the heartbeat's.
        bounds.server = bounds
            .server
            .max(bounds.heartbeat + bounds.timeout + Duration::from_secs(1));
        if config.get_application_name().is_none() {
            config.application_name("toctou-postgres");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(bounds.timeout.max(Duration::from_secs(5)));
        }
        config.keepalives(true);
        config.keepalives_idle(bounds.server / 2);
        let session = Session::open(&config, bounds, &runtime).await?;
        let (wakeups, _) = broadcast::channel(1024);
        let (stop, stop_rx) = watch::channel(false);
        runtime.spawn(session::listen(
            config.clone(),
            wakeups.clone(),
            stop_rx,
            bounds,
        ));
        Ok(PgLocks {
            inner: Arc::new(Inner {
                config,
                bounds,
                runtime,
                session: Mutex::new(session),
                reconnect: tokio::sync::Mutex::new(()),
                keyed: Arc::new(KeyedLocks::new()),
                wakeups,
                stop,
            }),
        })
    }
}

impl PgLocks {
    /// Connects to the server at `url` (`postgres://user@host:port/db`)
    /// with the default bounds: two connections, one that holds this
    /// process's locks and one that listens for releases.
    ///
    /// Must be called on a tokio runtime, which runs the connections'
    /// background tasks. Creates the fencing tables (`toctou_epoch`,
    /// `toctou_fence_count`) if they are missing.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] for an invalid URL, an unreachable server or
    /// wrong credentials; [`Error::Query`] or [`Error::Timeout`] if the
    /// session cannot be set up; [`Error::NoRuntime`] outside a tokio
    /// runtime.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), toctou_postgres::Error> {
    /// let locks = toctou_postgres::PgLocks::connect("postgres://postgres@127.0.0.1:5432/test").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<PgLocks, Error> {
        PgLocksBuilder::default().connect(url).await
    }

    /// Options: the heartbeat, the server-side bound, the poll interval.
    ///
    /// ```
    /// let builder = toctou_postgres::PgLocks::builder();
    /// # drop(builder);
    /// ```
    pub fn builder() -> PgLocksBuilder {
        PgLocksBuilder::default()
    }

    /// The holding session, reconnected if the last one was lost.
    async fn session(&self) -> Result<Arc<Session>, Error> {
        let current = self.current();
        if !current.is_lost() {
            return Ok(current);
        }
        let _one = self.inner.reconnect.lock().await;
        let current = self.current();
        if !current.is_lost() {
            return Ok(current);
        }
        let fresh =
            Session::open(&self.inner.config, self.inner.bounds, &self.inner.runtime).await?;
        *self
            .inner
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = fresh.clone();
        Ok(fresh)
    }

    fn current(&self) -> Arc<Session> {
        self.inner
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Locks `key`, waiting as long as it takes. Tasks of this process
    /// queue in-process first; the one at the front tries the server, and
    /// tries again when a release of the key is announced (or every poll
    /// interval).
    ///
    /// Cancel-safe: dropping the future leaves no lock on the server and
    /// no in-process waiter (a try in flight when it is dropped finishes in
    /// the background and releases what it took).
    ///
    /// # Errors
    ///
    /// [`Error::Query`], [`Error::Timeout`] or [`Error::Connect`] if the
    /// server cannot be reached; the wait ends with the error.
    ///
    /// ```no_run
    /// # async fn demo(locks: toctou_postgres::PgLocks) -> Result<(), toctou_postgres::Error> {
    /// let guard = locks.lock("workflow-7").await?;
    /// assert!(guard.is_held());
    /// # Ok(()) }
    /// ```
    pub async fn lock(&self, key: &str) -> Result<PgGuard, Error> {
        let guard = self.acquire(key, Wait::Forever).await?;
        Ok(guard.expect("a wait without deadline ends holding the key"))
    }

    /// Locks `key` if nobody holds it now (in this process or elsewhere);
    /// never waits for a holder, only for the server's answer.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock); a held key is `Ok(None)`.
    ///
    /// ```no_run
    /// # async fn demo(locks: toctou_postgres::PgLocks) -> Result<(), toctou_postgres::Error> {
    /// if let Some(guard) = locks.try_lock("cleanup-leader").await? {
    ///     // this replica leads
    /// #   drop(guard);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_lock(&self, key: &str) -> Result<Option<PgGuard>, Error> {
        self.acquire(key, Wait::No).await
    }

    /// Locks `key`, waiting at most `timeout`; `Ok(None)` on timeout, with
    /// nothing left behind.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```no_run
    /// # async fn demo(locks: toctou_postgres::PgLocks) -> Result<(), toctou_postgres::Error> {
    /// use std::time::Duration;
    /// match locks.try_lock_for("model-server-llama", Duration::from_secs(2)).await? {
    ///     Some(guard) => {
    ///         // start the server, then release
    ///         guard.release().await?;
    ///     }
    ///     None => { /* somebody else is starting it */ }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_lock_for(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<PgGuard>, Error> {
        let deadline = Instant::now() + timeout;
        self.acquire(key, Wait::Until(deadline)).await
    }

    async fn acquire(&self, key: &str, wait: Wait) -> Result<Option<PgGuard>, Error> {
        let queued = self.inner.keyed.lock_owned_async(key);
        let local = match wait {
            Wait::Forever => queued.await,
            // `timeout` polls the queue once before looking at the clock:
            // a free key is taken even with a zero timeout.
            Wait::No => match tokio::time::timeout(Duration::ZERO, queued).await {
                Ok(local) => local,
                Err(_) => return Ok(None),
            },
            Wait::Until(deadline) => match tokio::time::timeout_at(deadline, queued).await {
                Ok(local) => local,
                Err(_) => return Ok(None),
            },
        };
        let contact = Live { locks: self, wait };
        let patient = !matches!(wait, Wait::No);
        let server = protocol::acquire(&contact, key, patient);
        let taken = match wait {
            // The deadline bounds the server's part too (a slow try or a
            // reconnect): a try cut short there releases what it took.
            Wait::Until(deadline) => match tokio::time::timeout_at(deadline, server).await {
                Ok(taken) => taken?,
                Err(_) => return Ok(None),
            },
            Wait::No | Wait::Forever => server.await?,
        };
        let Some((advisory, fence, claim)) = taken else {
            return Ok(None);
        };
        let waiting = claim.waiting;
        Ok(Some(PgGuard {
            key: local,
            advisory,
            waiting,
            fence,
            session: claim.keep(),
            runtime: self.inner.runtime.clone(),
            released: false,
        }))
    }

    /// One try of `key` on `session`: its advisory key, and the fencing
    /// token with a [`Claim`] on the lock if it was taken. A taken lock
    /// travels as a `Claim`, which releases it when dropped, and the try
    /// finishes in a task of its own if the caller goes away while it is
    /// in flight ([`Finish`]): either way nothing is left behind.
    async fn try_once(
        &self,
        session: &Arc<Session>,
        key: &str,
    ) -> Result<(i64, Option<(i64, Claim)>), Error> {
        let task_session = session.clone();
        let task_key = protocol::server_key(key).into_owned();
        let timeout = self.inner.bounds.timeout;
        let runtime = self.inner.runtime.clone();
        let attempt = async move {
            let answer = tokio::time::timeout(timeout, try_lock(&task_session, &task_key)).await;
            match answer {
                Ok(Ok((advisory, waiting, token))) => Ok((
                    advisory,
                    token.map(|token| {
                        let claim = Claim {
                            session: Some(task_session.clone()),
                            advisory,
                            waiting,
                            runtime,
                        };
                        (token, claim)
                    }),
                )),
                Ok(Err(e)) => {
                    // The statement may have taken the lock before failing
                    // (a session-level lock outlives the failed
                    // statement), and which of this session's locks it
                    // took cannot be told apart from a colliding key's:
                    // end the session, which frees them all on the server.
                    task_session.mark_lost();
                    Err(Error::Query(e))
                }
                Err(_) => {
                    task_session.mark_lost();
                    Err(Error::Timeout)
                }
            }
        };
        Finish::new(attempt, self.inner.runtime.clone()).await
    }
}

/// A lock taken on the server that no guard owns yet: released (in the
/// background) when dropped, unless [`Claim::keep`] hands it to a guard.
struct Claim {
    /// `None` once kept.
    session: Option<Arc<Session>>,
    advisory: i64,
    /// The key's waiting key ([`protocol::REGISTER`]).
    waiting: i64,
    runtime: Handle,
}

impl Claim {
    /// The guard's share: the session that holds the lock.
    fn keep(mut self) -> Arc<Session> {
        self.session.take().expect("a claim is kept once")
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            spawn_unlock(&self.runtime, session, self.advisory, self.waiting);
        }
    }
}

/// The try of `key` on `session` ([`protocol::TRY_LOCK`]): the advisory
/// key, and the fencing token if the lock was taken. A lock taken while the
/// counters did not belong to the current epoch (the first acquisition
/// after a crash, or ever) starts a new epoch and then issues the token,
/// still under the lock.
async fn try_lock(
    session: &Session,
    key: &str,
) -> Result<(i64, i64, Option<i64>), tokio_postgres::Error> {
    let row = session
        .client
        .query_one(&session.statements.try_lock, &[&key])
        .await?;
    let (advisory, taken, token, waiting): (i64, bool, Option<i64>, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !taken || token.is_some() {
        return Ok((advisory, waiting, token));
    }
    session.client.batch_execute(protocol::NEW_EPOCH).await?;
    let row = session
        .client
        .query_one(&session.statements.fence, &[&key])
        .await?;
    Ok((advisory, waiting, Some(row.get(0))))
}

/// The release of `advisory` (announced if somebody registered on
/// `waiting`) on `session`: whether the server held the lock, or the error
/// (which ends the session, freeing the lock).
async fn unlock(session: Arc<Session>, advisory: i64, waiting: i64) -> Result<bool, Error> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&advisory, &waiting];
    let unlock = session
        .client
        .query_one(&session.statements.unlock, &params);
    match tokio::time::timeout(UNLOCK_TIMEOUT, unlock).await {
        Ok(Ok(row)) => Ok(row.get::<_, bool>(0)),
        Ok(Err(e)) => {
            session.mark_lost();
            Err(if session.client.is_closed() {
                Error::Lost
            } else {
                Error::Query(e)
            })
        }
        Err(_) => {
            session.mark_lost();
            Err(Error::Timeout)
        }
    }
}

/// Sends [`unlock`] in a task on `runtime`, for a drop. A runtime that has
/// shut down drops the task: its connections are gone too, and the server
/// frees the lock with them.
fn spawn_unlock(runtime: &Handle, session: Arc<Session>, advisory: i64, waiting: i64) {
    runtime.spawn(async move {
        let _ = unlock(session, advisory, waiting).await;
    });
}

/// A statement's future, polled in the caller's task (no hop to another
/// task on the way), that finishes in a task of its own if dropped before
/// it completes: a statement already sent runs to its end, and its output
/// is dropped there (a [`Claim`] in it releases its lock). This is what
/// makes the tries and releases cancel-safe.
struct Finish<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    future: Option<Pin<Box<F>>>,
    runtime: Handle,
}

impl<F: Future + Send + 'static> Finish<F>
where
    F::Output: Send + 'static,
{
    fn new(future: F, runtime: Handle) -> Self {
        Self {
            future: Some(Box::pin(future)),
            runtime,
        }
    }
}

impl<F: Future + Send + 'static> Future for Finish<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let Some(future) = this.future.as_mut() else {
            unreachable!("a Finish is not polled after it completed");
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        this.future = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for Finish<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            self.runtime.spawn(async move {
                drop(future.await);
            });
        }
    }
}

impl fmt::Debug for PgLocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgLocks")
            .field("bounds", &self.inner.bounds)
            .field("waiting_or_held_here", &self.inner.keyed.len())
            .finish_non_exhaustive()
    }
}

/// The waiting protocol's contact with the real server: the holding
/// session, the listener's announcements, the poll timer and the caller's
/// deadline.
struct Live<'a> {
    locks: &'a PgLocks,
    wait: Wait,
}

/// A waiter's subscription to release announcements, and the time of its
/// next retry (set at the first wait after a failed try).
struct Listening {
    announcements: broadcast::Receiver<i64>,
    retry_at: Option<Instant>,
}

/// A registration as a waiter of a key ([`protocol::REGISTER`]) on a
/// session; ended (in the background) when dropped.
struct Registration {
    session: Arc<Session>,
    waiting: i64,
    runtime: Handle,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.session.is_lost() {
            return; // the server ended it with the session
        }
        let (session, waiting) = (self.session.clone(), self.waiting);
        self.runtime.spawn(async move {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&waiting];
            let end = session
                .client
                .query_one(&session.statements.unregister, &params);
            if !matches!(tokio::time::timeout(UNLOCK_TIMEOUT, end).await, Ok(Ok(_))) {
                session.mark_lost();
            }
        });
    }
}

impl protocol::Contact for Live<'_> {
    type Error = Error;
    type Taken = Claim;
    type Subscription = Listening;
    type Registration = Registration;

    /// Cancel-safe as a try ([`Finish`]): a caller that goes away leaves no
    /// registration behind (the answer's `Registration` ends it on drop).
    async fn register(&self, key: &str) -> Result<Option<Registration>, Error> {
        let session = self.locks.session().await?;
        let key = protocol::server_key(key).into_owned();
        let timeout = self.locks.inner.bounds.timeout;
        let runtime = self.locks.inner.runtime.clone();
        let registering = async move {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
            let register = session
                .client
                .query_one(&session.statements.register, &params);
            match tokio::time::timeout(timeout, register).await {
                Ok(Ok(row)) => Ok(row.get::<_, bool>(0).then(|| Registration {
                    session: session.clone(),
                    waiting: row.get(1),
                    runtime,
                })),
                Ok(Err(e)) => {
                    // It may have registered: end the session, as a failed
                    // try does.
                    session.mark_lost();
                    Err(Error::Query(e))
                }
                Err(_) => {
                    session.mark_lost();
                    Err(Error::Timeout)
                }
            }
        };
        Finish::new(registering, self.locks.inner.runtime.clone()).await
    }

    fn subscribe(&self) -> Listening {
        Listening {
            announcements: self.locks.inner.wakeups.subscribe(),
            retry_at: None,
        }
    }

    async fn try_lock(&self, key: &str) -> Result<protocol::Attempt<Claim>, Error> {
        let session = self.locks.session().await?;
        let (advisory, taken) = self.locks.try_once(&session, key).await?;
        Ok(protocol::Attempt { advisory, taken })
    }

    fn tried(&self, subscription: &mut Listening) {
        subscription.retry_at = None;
    }

    async fn wait(&self, subscription: &mut Listening) -> protocol::Event {
        let now = Instant::now();
        let timer = *subscription
            .retry_at
            .get_or_insert(now + self.locks.inner.bounds.poll);
        let (until, at_deadline) = match self.wait {
            Wait::Until(deadline) if deadline <= now => return protocol::Event::Deadline,
            Wait::Until(deadline) if deadline <= timer => (deadline, true),
            _ => (timer, false),
        };
        let announcements = &mut subscription.announcements;
        let announced = async {
            match announcements.recv().await {
                Ok(session::WAKE_ALL) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    protocol::Event::Missed
                }
                Ok(advisory) => protocol::Event::Announced(advisory),
                // No listener: only the timer is left.
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        };
        match tokio::time::timeout_at(until, announced).await {
            Ok(event) => event,
            Err(_) if at_deadline => protocol::Event::Deadline,
            Err(_) => protocol::Event::Timer,
        }
    }
}

#[derive(Clone, Copy)]
enum Wait {
    No,
    Forever,
    Until(Instant),
}

/// A held key of a [`PgLocks`], with its fencing token. Released by
/// [`release`](Self::release), or in the background on drop.
///
/// The lock lives in this process's holding session on the server. If the
/// session ends (a terminated backend, a restart, a broken or partitioned
/// connection, missed heartbeats), the lock may be gone: [`lost`](Self::lost)
/// resolves and [`is_held`](Self::is_held) turns false within the
/// heartbeat's bound (2 s by default). For a partitioned client that is
/// before the server can give the key to anybody else (the server's bound
/// is longer); where the server ended the session itself (a terminated
/// backend, a restart) it freed the lock first. A holder must stop acting
/// on the key then; the fencing token refuses its writes that arrive after
/// a new holder's.
#[must_use = "the key is released as soon as the guard is dropped"]
pub struct PgGuard {
    key: OwnedKeyGuard<String>,
    advisory: i64,
    /// The key's waiting key ([`protocol::REGISTER`]).
    waiting: i64,
    fence: i64,
    session: Arc<Session>,
    runtime: Handle,
    released: bool,
}

impl PgGuard {
    /// The locked key.
    pub fn key(&self) -> &str {
        self.key.key()
    }

    /// The fencing token: larger than every token issued for this key
    /// before, in any process, on any machine, across server restarts.
    /// Pass it with every write the lock protects, and have the resource
    /// refuse a write whose token is below the last one it accepted (see
    /// the crate docs for the SQL pattern).
    pub fn fence(&self) -> i64 {
        self.fence
    }

    /// The advisory key the server locks: `hashtextextended(key, 0)`.
    pub fn advisory_key(&self) -> i64 {
        self.advisory
    }

    /// Whether the lock is still held, as far as this client knows: false
    /// once its session may have ended.
    pub fn is_held(&self) -> bool {
        !self.released && !self.session.is_lost()
    }

    /// Resolves when the lock may have been lost (its session ended, or
    /// stopped answering heartbeats). Independent of the guard's lifetime:
    /// select on it beside the work the lock protects.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut lost = self.session.lost_signal();
        async move {
            let _ = session::until_true(&mut lost).await;
        }
    }

    /// Releases the lock now and announces the release to waiters.
    ///
    /// # Errors
    ///
    /// [`Error::Lost`] if the lock had been lost (its session ended, or the
    /// server no longer held it); [`Error::Query`] or [`Error::Timeout`]
    /// if the server could not be reached (the session is then ended, which
    /// frees the lock on the server).
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        if self.session.is_lost() {
            return Err(Error::Lost);
        }
        // A release whose future is dropped still completes, exactly once
        // ([`Finish`]).
        let unlocking = unlock(self.session.clone(), self.advisory, self.waiting);
        match Finish::new(unlocking, self.runtime.clone()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Lost),
            Err(e) => Err(e),
        }
    }
}

/// How long a release may take before its session is ended instead.
const UNLOCK_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for PgGuard {
    fn drop(&mut self) {
        if self.released || self.session.is_lost() {
            return;
        }
        self.released = true;
        spawn_unlock(
            &self.runtime,
            self.session.clone(),
            self.advisory,
            self.waiting,
        );
    }
}

impl fmt::Debug for PgGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgGuard")
            .field("key", &self.key())
            .field("fence", &self.fence)
            .field("held", &self.is_held())
            .finish()
    }
}
