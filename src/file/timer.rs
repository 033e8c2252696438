//! A runtime-agnostic sleep for `FileLocks`' async waits, which poll an OS
//! lock that another process holds (`flock` cannot be awaited).
//!
//! One timer thread per process serves every sleeping future: it is started
//! at the first sleep and then waits on a condition variable for the
//! earliest deadline. A future registers its deadline and waker when first
//! polled, refreshes the waker if a later poll brings another one, and
//! removes its entry when dropped, so a cancelled wait leaves nothing
//! behind. If the thread cannot be started, a sleeping future wakes its
//! task at once (the wait then polls without pausing, which is slower but
//! still correct).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The sleeping futures: by deadline (with an id, for equal deadlines), and
/// their wakers by id.
#[derive(Default)]
struct Entries {
    by_deadline: BTreeSet<(Instant, u64)>,
    wakers: HashMap<u64, (Instant, Waker)>,
    next_id: u64,
}

struct Timer {
    entries: Mutex<Entries>,
    changed: Condvar,
}

impl Timer {
    /// The process's timer, its thread started on first use; `None` if the
    /// thread could not be started.
    fn get() -> Option<&'static Timer> {
        static TIMER: OnceLock<Option<&'static Timer>> = OnceLock::new();
        *TIMER.get_or_init(|| {
            let timer: &'static Timer = Box::leak(Box::new(Timer {
                entries: Mutex::new(Entries::default()),
                changed: Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("toctou-filelocks-timer".into())
                .spawn(move || timer.run())
                .ok()
                .map(|_| timer)
        })
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The timer thread: wakes every future whose deadline passed, then
    /// waits for the next deadline or a new entry.
    fn run(&self) {
        let mut entries = self.lock();
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(&(at, id)) = entries.by_deadline.first() {
                if at > now {
                    break;
                }
                entries.by_deadline.pop_first();
                if let Some((_, waker)) = entries.wakers.remove(&id) {
                    due.push(waker);
                }
            }
            let next = entries.by_deadline.first().map(|&(at, _)| at);
            if !due.is_empty() {
                // Wake outside the lock: a waker may poll at once.
                drop(entries);
                due.into_iter().for_each(Waker::wake);
                entries = self.lock();
                continue;
            }
            entries = match next {
                None => self
                    .changed
                    .wait(entries)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(at) => {
                    let pause = at.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(entries, pause)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

/// Resolves once `pause` has passed; cancel-safe (dropping it removes its
/// entry from the timer).
pub(super) struct Sleep {
    until: Instant,
    /// The timer entry, once registered.
    id: Option<u64>,
}

impl Sleep {
    pub(super) fn new(pause: Duration) -> Self {
        Self {
            until: Instant::now() + pause,
            id: None,
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.until {
            return Poll::Ready(());
        }
        let Some(timer) = Timer::get() else {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        let mut entries = timer.lock();
        match self.id {
            Some(id) => match entries.wakers.get_mut(&id) {
                Some((_, waker)) => waker.clone_from(cx.waker()),
                // Woken (and removed) by the timer: the deadline has passed
                // by the timer's clock.
                None => return Poll::Ready(()),
            },
            None => {
                let id = entries.next_id;
                entries.next_id += 1;
                entries.by_deadline.insert((self.until, id));
                entries.wakers.insert(id, (self.until, cx.waker().clone()));
                let earliest = entries.by_deadline.first().copied();
                drop(entries);
                self.id = Some(id);
                if earliest == Some((self.until, id)) {
                    timer.changed.notify_one();
                }
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        let (Some(id), Some(timer)) = (self.id, Timer::get()) else {
            return;
        };
        let mut entries = timer.lock();
        if let Some((at, _)) = entries.wakers.remove(&id) {
            entries.by_deadline.remove(&(at, id));
        }
    }
}

#[cfg(all(test, not(miri)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    /// Unparks the test thread.
    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Polls every future until all are ready, parking in between.
    fn block_on_all(mut sleeps: Vec<Pin<Box<Sleep>>>) {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        while !sleeps.is_empty() {
            sleeps.retain_mut(|sleep| sleep.as_mut().poll(&mut cx).is_pending());
            if !sleeps.is_empty() {
                std::thread::park_timeout(Duration::from_secs(1));
            }
        }
    }

    fn registered(id: u64) -> bool {
        Timer::get().unwrap().lock().wakers.contains_key(&id)
    }

    #[test]
    fn sleeps_end_after_their_pause_and_leave_no_entry() {
        let start = Instant::now();
        let sleeps = (0..50u64)
            .map(|i| Box::pin(Sleep::new(Duration::from_millis(i % 10 + 1))))
            .collect();
        block_on_all(sleeps);
        assert!(start.elapsed() >= Duration::from_millis(10));
        let entries = Timer::get().unwrap().lock();
        assert!(entries.by_deadline.len() == entries.wakers.len());
    }

    #[test]
    fn a_dropped_sleep_removes_its_entry() {
        let mut sleep = Box::pin(Sleep::new(Duration::from_secs(3600)));
        let waker = Waker::noop();
        assert!(
            sleep
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_pending()
        );
        let id = sleep.id.unwrap();
        assert!(registered(id));
        drop(sleep);
        assert!(!registered(id), "the cancelled sleep's entry is gone");
    }
}
