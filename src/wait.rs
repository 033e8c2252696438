//! The one waiter queue: parks threads and stores wakers, behind one mutex.
//!
//! Every primitive that waits uses this queue, so sync and async callers of the
//! same primitive wait in the same place and wake each other.
//!
//! The protocol is a condition variable with the predicate checked under the
//! queue lock, which is what rules out lost wake-ups:
//!
//! - A waiter locks the queue, evaluates `should_park` and, if it says so,
//!   enqueues itself before it unlocks. `should_park` is where a primitive
//!   records "somebody is waiting" in its own state word.
//! - A notifier first changes the primitive's state, and only then locks the
//!   queue to drain it ([`WaitQueue::notify_all`]).
//!
//! Either the waiter's critical section comes first, and the notifier finds it
//! in the queue; or the notifier's state change is visible to the waiter's
//! `should_park` (the mutex orders the two critical sections), and the waiter
//! does not park. Entries leave the queue only by being notified or by the
//! waiter cancelling; a cancelled async waiter removes its own entry, so no
//! ghost stays behind.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{self, Mutex, Thread, loom_const_fn};

/// How to wake one waiter.
enum Unpark {
    Thread(Thread),
    Task(Waker),
}

impl Unpark {
    fn wake(self) {
        match self {
            Unpark::Thread(thread) => thread.unpark(),
            Unpark::Task(waker) => waker.wake(),
        }
    }
}

/// The queue's contents: waiters in arrival order, each with a unique id.
struct WaitList {
    next_id: u64,
    waiters: Vec<(u64, Unpark)>,
}

impl WaitList {
    fn push(&mut self, unpark: Unpark) -> u64 {
        let id = self.next_id;
        // u64 ids do not wrap in practice (one per wait, 2^64 waits).
        self.next_id += 1;
        self.waiters.push((id, unpark));
        id
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.waiters.iter().position(|(i, _)| *i == id)
    }
}

/// A queue of parked threads and pending tasks.
pub(crate) struct WaitQueue {
    list: Mutex<WaitList>,
}

impl WaitQueue {
    loom_const_fn! {
        pub(crate) fn new() -> Self {
            Self {
                list: Mutex::new(WaitList {
                    next_id: 0,
                    waiters: Vec::new(),
                }),
            }
        }
    }

    /// Parks the current thread until it is notified.
    ///
    /// `should_park` runs under the queue lock. If it returns `false`, this
    /// returns at once. Otherwise the thread is enqueued and parks until a
    /// [`notify_all`](Self::notify_all) removes it; spurious unparks are
    /// absorbed here. Callers re-check their state after this returns.
    pub(crate) fn wait(&self, should_park: impl FnOnce() -> bool) {
        let id = {
            let mut list = self.list.lock();
            if !should_park() {
                return;
            }
            list.push(Unpark::Thread(sync::current()))
        };
        loop {
            sync::park();
            // Our entry leaves the list only through `notify_all`, which
            // removes it under the lock before unparking us; the unpark token
            // is kept if it arrives before `park`, so it cannot be lost.
            if self.list.lock().position(id).is_none() {
                return;
            }
        }
    }

    /// The async form of [`wait`](Self::wait): a future that resolves once the
    /// task has been notified, or at its first poll if `should_park` returns
    /// `false`. Dropping it before then removes its entry.
    pub(crate) fn wait_async<P: FnOnce() -> bool>(&self, should_park: P) -> WaitFuture<'_, P> {
        WaitFuture {
            queue: self,
            should_park: Some(should_park),
            id: None,
        }
    }

    /// Wakes every waiter. Call it after the state change the waiters wait
    /// for is visible, never before.
    pub(crate) fn notify_all(&self) {
        let waiters = std::mem::take(&mut self.list.lock().waiters);
        // Wake outside the lock: a woken thread's first act is to lock it.
        for (_, unpark) in waiters {
            unpark.wake();
        }
    }
}

/// Future returned by [`WaitQueue::wait_async`].
#[must_use = "futures do nothing unless polled"]
pub(crate) struct WaitFuture<'a, P> {
    queue: &'a WaitQueue,
    should_park: Option<P>,
    id: Option<u64>,
}

// `WaitFuture` holds no self-references and never pins its fields.
impl<P> Unpin for WaitFuture<'_, P> {}

impl<P: FnOnce() -> bool> Future for WaitFuture<'_, P> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut list = this.queue.list.lock();
        match this.id {
            None => {
                let Some(should_park) = this.should_park.take() else {
                    // Polled again after completion: stay complete.
                    return Poll::Ready(());
                };
                if !should_park() {
                    return Poll::Ready(());
                }
                this.id = Some(list.push(Unpark::Task(cx.waker().clone())));
                Poll::Pending
            }
            Some(id) => match list.position(id) {
                Some(at) => {
                    // Still queued: a spurious poll. Keep the newest waker.
                    let entry = &mut list.waiters[at].1;
                    match entry {
                        Unpark::Task(w) if w.will_wake(cx.waker()) => {}
                        _ => *entry = Unpark::Task(cx.waker().clone()),
                    }
                    Poll::Pending
                }
                None => {
                    this.id = None;
                    Poll::Ready(())
                }
            },
        }
    }
}

impl<P> Drop for WaitFuture<'_, P> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut list = self.queue.list.lock();
            if let Some(at) = list.position(id) {
                // `remove`, not `swap_remove`: the list stays in arrival order.
                list.waiters.remove(at);
            }
        }
    }
}

#[cfg(all(test, not(toctou_loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::task::Wake;

    impl WaitQueue {
        fn len(&self) -> usize {
            self.list.lock().waiters.len()
        }
    }

    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, SeqCst);
        }
    }

    fn poll<F: Future + Unpin>(fut: &mut F, waker: &Waker) -> Poll<F::Output> {
        Pin::new(fut).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn cancelled_async_waiter_removes_its_entry() {
        let queue = WaitQueue::new();
        let mut waiters: Vec<_> = (0..3).map(|_| queue.wait_async(|| true)).collect();
        for w in &mut waiters {
            assert!(poll(w, Waker::noop()).is_pending());
        }
        assert_eq!(queue.len(), 3);
        drop(waiters.remove(1));
        assert_eq!(queue.len(), 2, "the dropped waiter's entry is gone");
        drop(waiters);
        assert_eq!(queue.len(), 0, "no ghosts");
    }

    #[test]
    fn async_waiter_completes_only_after_notify() {
        let queue = WaitQueue::new();
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut waiter = queue.wait_async(|| true);
        assert!(poll(&mut waiter, &waker).is_pending());
        assert!(
            poll(&mut waiter, &waker).is_pending(),
            "a spurious poll stays queued"
        );
        assert_eq!(queue.len(), 1, "re-polling does not enqueue twice");
        queue.notify_all();
        assert!(flag.0.load(SeqCst), "notify_all wakes the task");
        assert!(poll(&mut waiter, &waker).is_ready());
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn repoll_with_a_new_waker_replaces_the_old_one() {
        let queue = WaitQueue::new();
        let first = Arc::new(Flag(AtomicBool::new(false)));
        let second = Arc::new(Flag(AtomicBool::new(false)));
        let mut waiter = queue.wait_async(|| true);
        assert!(poll(&mut waiter, &Waker::from(first.clone())).is_pending());
        // The task moved (say, to another executor): it is polled with a new waker.
        assert!(poll(&mut waiter, &Waker::from(second.clone())).is_pending());
        queue.notify_all();
        assert!(second.0.load(SeqCst), "the newest waker is the one woken");
        assert!(!first.0.load(SeqCst), "the stale waker was dropped");
    }

    #[test]
    fn a_notified_waiter_is_not_confused_with_a_later_one() {
        // Entries are matched by id: a waiter notified earlier must complete
        // even though another waiter has queued since.
        let queue = WaitQueue::new();
        let mut early = queue.wait_async(|| true);
        assert!(poll(&mut early, Waker::noop()).is_pending());
        queue.notify_all();
        let mut late = queue.wait_async(|| true);
        assert!(poll(&mut late, Waker::noop()).is_pending());
        assert!(poll(&mut early, Waker::noop()).is_ready());
        assert!(poll(&mut late, Waker::noop()).is_pending(), "still queued");
        drop(late);
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn should_park_false_means_no_entry() {
        let queue = WaitQueue::new();
        let mut waiter = queue.wait_async(|| false);
        assert!(poll(&mut waiter, Waker::noop()).is_ready());
        queue.wait(|| false);
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn notify_all_unparks_a_parked_thread() {
        let queue = Arc::new(WaitQueue::new());
        let parked = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.wait(|| true))
        };
        while queue.len() == 0 {
            std::thread::yield_now();
        }
        queue.notify_all();
        parked.join().unwrap();
        assert_eq!(queue.len(), 0);
    }
}
