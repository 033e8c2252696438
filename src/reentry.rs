//! Reentrancy detection: which cells is *this thread* initialising right now?
//!
//! Each thread keeps a small stack of the addresses of the cells whose
//! initialiser it is currently running. Only the owning thread reads or writes
//! its stack, so the check needs no synchronisation and cannot race. A cell's
//! address is unique while it is on the stack, because the initialiser borrows
//! the cell for exactly that long.
//!
//! The check runs only on slow paths (when a caller finds a cell busy), never
//! on the initialised fast path.

use std::cell::RefCell;
use std::future::Future;

use crate::sync::thread_local;

thread_local! {
    // Not `const { .. }`: loom's `thread_local!` does not accept that form.
    #[allow(clippy::missing_const_for_thread_local)]
    static INITIALISING: RefCell<Vec<usize>> = RefCell::new(Vec::new());
}

/// Marks the current thread as running the initialiser of the cell at `addr`
/// for as long as the mark lives. Unmarks on drop, also on unwind.
#[must_use]
pub(crate) struct Mark {
    addr: usize,
}

impl Mark {
    pub(crate) fn enter(addr: usize) -> Self {
        INITIALISING.with(|stack| stack.borrow_mut().push(addr));
        Mark { addr }
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        // `try_with`: during thread teardown the stack may already be gone.
        let _ = INITIALISING.try_with(|stack| {
            let mut stack = stack.borrow_mut();
            // Marks nest, so ours is normally on top; search anyway, in case a
            // future that holds a mark is dropped out of order.
            if let Some(at) = stack.iter().rposition(|a| *a == self.addr) {
                stack.remove(at);
            }
        });
    }
}

/// Whether the current thread is running the initialiser of the cell at `addr`.
pub(crate) fn is_initialising(addr: usize) -> bool {
    INITIALISING
        .try_with(|stack| stack.borrow().contains(&addr))
        .unwrap_or(false)
}

/// Creates the initialiser's future with `make` and polls it to completion,
/// with the current thread marked as initialising `addr` while `make` runs and
/// during each poll, never across a suspension: other tasks on this thread may
/// wait for the same cell in the meantime without a false reentrancy panic.
pub(crate) async fn poll_marked<F: Future>(addr: usize, make: impl FnOnce() -> F) -> F::Output {
    let fut = {
        let _mark = Mark::enter(addr);
        make()
    };
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        let _mark = Mark::enter(addr);
        fut.as_mut().poll(cx)
    })
    .await
}
