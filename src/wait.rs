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

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{self, Mutex, Thread, loom_const_fn};

/// How to wake one waiter: a parked thread or a pending task.
#[derive(Clone)]
pub(crate) enum Unpark {
    Thread(Thread),
    Task(Waker),
}

impl Unpark {
    /// The current thread, to be unparked later.
    pub(crate) fn current_thread() -> Self {
        Unpark::Thread(sync::current())
    }

    pub(crate) fn wake(self) {
        match self {
            Unpark::Thread(thread) => thread.unpark(),
            Unpark::Task(waker) => waker.wake(),
        }
    }

    /// Replaces a task's waker with `waker` unless it would wake the same
    /// task: called when a queued future is polled again, perhaps by another
    /// executor.
    pub(crate) fn refresh(&mut self, waker: &Waker) {
        match self {
            Unpark::Task(w) if w.will_wake(waker) => {}
            _ => *self = Unpark::Task(waker.clone()),
        }
    }
}

/// One queued waiter: its id, how to wake it, and what the primitive that
/// owns the list wants to remember about it.
pub(crate) struct Waiter<D> {
    pub(crate) id: u64,
    pub(crate) unpark: Unpark,
    pub(crate) data: D,
}

/// Waiters in arrival order, each with a unique, increasing id.
///
/// The list is not synchronised itself: [`WaitQueue`] keeps one behind its
/// own mutex, and the keyed locks keep one per key under the shard lock.
/// Because ids only grow and entries are only appended, the list stays
/// sorted by id, and [`position`](Self::position) is a binary search: a
/// cancelled waiter among ten thousand finds itself in 14 steps.
pub(crate) struct WaitList<D> {
    next_id: u64,
    waiters: VecDeque<Waiter<D>>,
}

impl<D> WaitList<D> {
    pub(crate) const fn new() -> Self {
        Self {
            next_id: 0,
            waiters: VecDeque::new(),
        }
    }

    /// Appends a waiter and returns its id.
    pub(crate) fn push(&mut self, unpark: Unpark, data: D) -> u64 {
        let id = self.next_id;
        // u64 ids do not wrap in practice (one per wait, 2^64 waits).
        self.next_id += 1;
        self.waiters.push_back(Waiter { id, unpark, data });
        id
    }

    /// Where the waiter with id `id` is, if it is still queued.
    pub(crate) fn position(&self, id: u64) -> Option<usize> {
        self.waiters.binary_search_by_key(&id, |w| w.id).ok()
    }

    /// Removes the waiter at `at`, keeping the others in arrival order.
    pub(crate) fn remove(&mut self, at: usize) -> Option<Waiter<D>> {
        self.waiters.remove(at)
    }

    pub(crate) fn get_mut(&mut self, at: usize) -> Option<&mut Waiter<D>> {
        self.waiters.get_mut(at)
    }

    pub(crate) fn front(&self) -> Option<&Waiter<D>> {
        self.waiters.front()
    }

    pub(crate) fn front_mut(&mut self) -> Option<&mut Waiter<D>> {
        self.waiters.front_mut()
    }

    pub(crate) fn pop_front(&mut self) -> Option<Waiter<D>> {
        self.waiters.pop_front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    #[cfg(all(test, not(toctou_loom)))]
    pub(crate) fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Removes every waiter, in arrival order.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Waiter<D>> {
        std::mem::take(&mut self.waiters).into_iter()
    }
}

/// A [`WaitList`] allocated by its first waiter.
///
/// Most once-cells never see a waiter, and an inline list (an id counter and
/// a `VecDeque`) would add 32 bytes to every one of them: with it boxed, a
/// [`WaitQueue`] is a mutex and a pointer, 16 bytes on 64-bit Linux. The
/// allocation is paid once per queue, by a caller that is about to park
/// anyway, and the list is kept (not freed when it empties) until the queue
/// drops, so ids stay unique for the queue's whole life: a waiter's id can
/// never be handed to a later waiter of the same queue.
struct LazyWaitList(Option<Box<WaitList<()>>>);

impl LazyWaitList {
    /// Appends a waiter, allocating the list the first time, and returns its id.
    fn push(&mut self, unpark: Unpark, data: ()) -> u64 {
        self.0
            .get_or_insert_with(|| Box::new(WaitList::new()))
            .push(unpark, data)
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.0.as_ref()?.position(id)
    }

    fn remove(&mut self, at: usize) -> Option<Waiter<()>> {
        self.0.as_mut()?.remove(at)
    }

    fn get_mut(&mut self, at: usize) -> Option<&mut Waiter<()>> {
        self.0.as_mut()?.get_mut(at)
    }

    /// Removes every waiter, in arrival order; keeps the (empty) list.
    fn drain(&mut self) -> impl Iterator<Item = Waiter<()>> {
        self.0
            .as_mut()
            .map(|list| list.drain())
            .into_iter()
            .flatten()
    }

    #[cfg(all(test, not(toctou_loom)))]
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |list| list.len())
    }
}

/// A queue of parked threads and pending tasks.
pub(crate) struct WaitQueue {
    list: Mutex<LazyWaitList>,
}

impl WaitQueue {
    loom_const_fn! {
        pub(crate) fn new() -> Self {
            Self {
                list: Mutex::new(LazyWaitList(None)),
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
            list.push(Unpark::current_thread(), ())
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
        let waiters: Vec<_> = self.list.lock().drain().collect();
        // Wake outside the lock: a woken thread's first act is to lock it.
        for waiter in waiters {
            waiter.unpark.wake();
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
                this.id = Some(list.push(Unpark::Task(cx.waker().clone()), ()));
                Poll::Pending
            }
            Some(id) => match list.position(id) {
                Some(at) => {
                    // Still queued: a spurious poll. Keep the newest waker.
                    if let Some(waiter) = list.get_mut(at) {
                        waiter.unpark.refresh(cx.waker());
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
                list.remove(at);
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
            self.list.lock().len()
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
