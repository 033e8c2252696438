//! Loom models of `toctou-postgres`' waiting protocol
//! (`toctou_postgres::protocol::acquire`), run over a simulated server in
//! which threads play client processes.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg toctou_loom" cargo test --release -p toctou-postgres --test loom_pg_protocol
//! ```
//!
//! The simulated server keeps the advisory locks (a holder per advisory
//! key), the registered waiters per key and the `LISTEN` subscriptions; a
//! release unlocks and then, if a waiter is registered, announces to every
//! subscription, as the real release statement does (`pg_advisory_unlock`,
//! the check of the waiting key, then `pg_notify`, delivered at commit). Waits
//! have no timer here: the real protocol's poll would hide a lost
//! wake-up, which loom then reports as a deadlock.
#![cfg(toctou_loom)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::task::{Context, Poll};

use loom::future::AtomicWaker;
use loom::sync::atomic::AtomicUsize;
use loom::sync::{Arc, Mutex};
use loom::thread;
use toctou_postgres::protocol::{self, Attempt, Contact, Event};

/// The advisory keys of the model's keys (distinct).
fn advisory(key: &str) -> i64 {
    key.len() as i64
}

#[derive(Default)]
struct Subscription {
    announced: Mutex<VecDeque<i64>>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct State {
    /// The session holding each advisory key.
    holders: HashMap<i64, usize>,
    /// Registered waiters per key (the real waiting key's shared holders).
    waiting: HashMap<i64, usize>,
    subscriptions: Vec<Arc<Subscription>>,
    tokens: HashMap<i64, i64>,
}

#[derive(Clone, Default)]
struct Server(Arc<Mutex<State>>);

impl Server {
    /// The release statement: unlock, then announce if a waiter is
    /// registered (the unlock and the check are one step on the server).
    fn release(&self, session: usize, key: &str) {
        let advisory = advisory(key);
        let subscriptions = {
            let mut state = self.0.lock().unwrap();
            assert_eq!(
                state.holders.remove(&advisory),
                Some(session),
                "released by its holder"
            );
            if state.waiting.get(&advisory).copied().unwrap_or(0) == 0 {
                return; // nobody waits: no NOTIFY
            }
            state.subscriptions.clone()
        };
        for subscription in subscriptions {
            subscription.announced.lock().unwrap().push_back(advisory);
            subscription.waker.wake();
        }
    }
}

/// One client process's contact with the simulated server.
struct Client {
    server: Server,
    session: usize,
}

/// A waiter's registration: counted while it lives.
struct Registered {
    server: Server,
    advisory: i64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut state = self.server.0.lock().unwrap();
        *state.waiting.get_mut(&self.advisory).unwrap() -= 1;
    }
}

impl Contact for Client {
    type Error = ();
    type Taken = ();
    type Subscription = Arc<Subscription>;
    type Registration = Registered;

    async fn register(&self, key: &str) -> Result<Option<Registered>, ()> {
        let advisory = advisory(key);
        *self
            .server
            .0
            .lock()
            .unwrap()
            .waiting
            .entry(advisory)
            .or_insert(0) += 1;
        Ok(Some(Registered {
            server: self.server.clone(),
            advisory,
        }))
    }

    fn subscribe(&self) -> Arc<Subscription> {
        let subscription = Arc::new(Subscription::default());
        self.server
            .0
            .lock()
            .unwrap()
            .subscriptions
            .push(subscription.clone());
        subscription
    }

    async fn try_lock(&self, key: &str) -> Result<Attempt<()>, ()> {
        let advisory = advisory(key);
        let mut state = self.server.0.lock().unwrap();
        if state.holders.contains_key(&advisory) {
            return Ok(Attempt {
                advisory,
                taken: None,
            });
        }
        state.holders.insert(advisory, self.session);
        let token = state.tokens.entry(advisory).or_insert(0);
        *token += 1;
        Ok(Attempt {
            advisory,
            taken: Some((*token, ())),
        })
    }

    fn wait(&self, subscription: &mut Arc<Subscription>) -> impl Future<Output = Event> {
        NextAnnouncement(subscription.clone())
    }
}

/// Resolves with the next announcement on a subscription.
struct NextAnnouncement(Arc<Subscription>);

impl Future for NextAnnouncement {
    type Output = Event;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Event> {
        self.0.waker.register_by_ref(cx.waker());
        match self.0.announced.lock().unwrap().pop_front() {
            Some(advisory) => Poll::Ready(Event::Announced(advisory)),
            None => Poll::Pending,
        }
    }
}

/// Counts who believes they hold the key.
#[derive(Clone, Default)]
struct Detector(Arc<AtomicUsize>);

impl Detector {
    fn enter(&self) {
        assert_eq!(self.0.fetch_add(1, SeqCst), 0, "two holders at once");
    }
    fn leave(&self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// A client takes `key` (waiting as long as it takes), holds it, releases.
fn client_locks(server: &Server, session: usize, key: &str, det: &Detector) -> i64 {
    let client = Client {
        server: server.clone(),
        session,
    };
    let (_, token, ()) = loom::future::block_on(protocol::acquire(&client, key, true))
        .unwrap()
        .expect("a patient acquisition ends holding the key");
    det.enter();
    det.leave();
    server.release(session, key);
    token
}

fn bounded(preemptions: usize) -> loom::model::Builder {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(preemptions);
    model
}

/// A holder releases while another client tries and starts waiting: the
/// waiter is always woken (a lost wake-up is a loom deadlock), the two
/// never hold at once, and the waiter's token is the larger. Bounded to
/// three preemptions.
///
/// Catches: subscribing after the failed try (the release's announcement
/// falls between the two); a wait that skips its own key's announcement.
#[test]
fn a_release_wakes_a_waiter_that_just_failed_its_try() {
    bounded(3).check(|| {
        let server = Server::default();
        let det = Detector::default();
        // The holder takes the key first.
        let holder = Client {
            server: server.clone(),
            session: 1,
        };
        let (_, first, ()) = loom::future::block_on(protocol::acquire(&holder, "k", true))
            .unwrap()
            .unwrap();
        det.enter();
        let waiter = {
            let (server, det) = (server.clone(), det.clone());
            thread::spawn(move || client_locks(&server, 2, "k", &det))
        };
        det.leave();
        server.release(1, "k");
        let second = waiter.join().unwrap();
        assert!(second > first);
    });
}

/// Two clients wait for one key while a third holds it, and announcements
/// of another key's releases arrive in between: each waiter skips those
/// and still gets the key. Bounded to two preemptions.
///
/// Catches: a wait that skips its own key's announcement; a wait that
/// gives up on another key's announcement.
#[test]
fn waiters_skip_other_keys_announcements() {
    bounded(2).check(|| {
        let server = Server::default();
        let det = Detector::default();
        let holder = Client {
            server: server.clone(),
            session: 1,
        };
        loom::future::block_on(protocol::acquire(&holder, "k", true))
            .unwrap()
            .unwrap();
        loom::future::block_on(protocol::acquire(&holder, "other", true))
            .unwrap()
            .unwrap();
        // Somebody waits for "other" too, so its release is announced (a
        // release nobody waits for is not).
        let other_waiter = loom::future::block_on(holder.register("other"))
            .unwrap()
            .unwrap();
        let waiters: Vec<_> = (2..4)
            .map(|session| {
                let (server, det) = (server.clone(), det.clone());
                thread::spawn(move || client_locks(&server, session, "k", &det))
            })
            .collect();
        server.release(1, "other");
        server.release(1, "k");
        for waiter in waiters {
            waiter.join().unwrap();
        }
        drop(other_waiter);
    });
}

/// A client that does not wait (`try_lock`) gets `None` on a held key and
/// takes a free one. Not bounded (two threads, few steps).
#[test]
fn an_impatient_try_never_waits() {
    loom::model(|| {
        let server = Server::default();
        let a = Client {
            server: server.clone(),
            session: 1,
        };
        loom::future::block_on(protocol::acquire(&a, "k", true))
            .unwrap()
            .unwrap();
        let other = {
            let server = server.clone();
            thread::spawn(move || {
                let b = Client { server, session: 2 };
                loom::future::block_on(protocol::acquire(&b, "k", false)).unwrap()
            })
        };
        let got = other.join().unwrap();
        assert!(got.is_none(), "held by the first client");
        server.release(1, "k");
    });
}
