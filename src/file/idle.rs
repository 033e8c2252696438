//! The keeping mode's idle descriptors: descriptors of released keys that
//! stay open, unlocked, so that locking the key again skips `open` and
//! `close` (see *Kept descriptors* in `protocol.rs` for why that is sound).
//!
//! At most `cap` are kept; the oldest kept is closed first. A key's kept
//! descriptor is taken out while the key is held, so a descriptor is never
//! both kept and in use.

use std::collections::{HashMap, VecDeque};

/// Up to `cap` idle descriptors by file name, closed oldest first.
pub struct Idle<Fd> {
    cap: usize,
    /// Each name's descriptor, and the stamp it was kept with.
    fds: HashMap<String, (Fd, u64)>,
    /// Names in the order they were kept, with their stamps; an entry whose
    /// stamp no longer matches `fds` is stale (taken out since) and skipped.
    order: VecDeque<(String, u64)>,
    next_stamp: u64,
}

impl<Fd> Idle<Fd> {
    /// An empty set that keeps at most `cap` descriptors (0: none).
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            fds: HashMap::new(),
            order: VecDeque::new(),
            next_stamp: 0,
        }
    }

    /// How many it keeps now.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Takes out the descriptor kept for `name`, if any.
    pub fn take(&mut self, name: &str) -> Option<Fd> {
        self.fds.remove(name).map(|(fd, _)| fd)
    }

    /// Keeps `fd` for `name`. Returns what must be closed: the oldest kept
    /// descriptor if that makes one too many, or `fd` itself if `cap` is 0.
    /// (Returned, not dropped here: the caller closes it after unlocking.)
    pub fn keep(&mut self, name: &str, fd: Fd) -> Option<Fd> {
        if self.cap == 0 {
            return Some(fd);
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let replaced = self.fds.insert(name.to_owned(), (fd, stamp));
        self.order.push_back((name.to_owned(), stamp));
        if let Some((old, _)) = replaced {
            return Some(old);
        }
        let mut evicted = None;
        while self.fds.len() > self.cap {
            let Some((oldest, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.fds.get(&oldest).is_some_and(|&(_, s)| s == stamp) {
                evicted = self.fds.remove(&oldest).map(|(fd, _)| fd);
            }
        }
        // Stale entries (names taken out since) are dropped in batches, so
        // that `order` stays within a constant factor of `cap`.
        if self.order.len() > 2 * self.cap + 16 {
            let fds = &self.fds;
            self.order
                .retain(|(name, stamp)| fds.get(name).is_some_and(|&(_, s)| s == *stamp));
        }
        evicted
    }

    /// Takes out every kept descriptor (to close them).
    pub fn drain(&mut self) -> Vec<Fd> {
        self.order.clear();
        self.fds.drain().map(|(_, (fd, _))| fd).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Idle;

    #[test]
    fn keeps_at_most_cap_and_evicts_the_oldest() {
        let mut idle = Idle::new(2);
        assert_eq!(idle.keep("a", 1), None);
        assert_eq!(idle.keep("b", 2), None);
        assert_eq!(idle.keep("c", 3), Some(1), "a was kept first");
        assert_eq!(idle.len(), 2);
        assert_eq!(idle.take("a"), None);
        assert_eq!(idle.take("b"), Some(2));
        assert_eq!(idle.take("b"), None, "taken out once");
        assert_eq!(idle.keep("d", 4), None);
        assert_eq!(idle.keep("e", 5), Some(3), "c is now the oldest");
    }

    #[test]
    fn a_key_kept_again_replaces_its_old_descriptor() {
        let mut idle = Idle::new(4);
        assert_eq!(idle.keep("a", 1), None);
        assert_eq!(idle.keep("a", 2), Some(1));
        assert_eq!(idle.len(), 1);
        assert_eq!(idle.take("a"), Some(2));
    }

    #[test]
    fn cap_zero_keeps_nothing() {
        let mut idle = Idle::new(0);
        assert_eq!(idle.keep("a", 1), Some(1));
        assert_eq!(idle.len(), 0);
    }

    #[test]
    fn retaking_one_key_forever_keeps_the_order_bounded() {
        let mut idle = Idle::new(2);
        for i in 0..10_000 {
            assert_eq!(idle.keep("hot", i), None);
            assert_eq!(idle.take("hot"), Some(i));
        }
        assert!(idle.order.len() <= 2 * 2 + 16, "{}", idle.order.len());
        // An old stale entry of "hot" must not evict the new one early.
        assert_eq!(idle.keep("hot", 1), None);
        assert_eq!(idle.keep("x", 2), None);
        assert_eq!(idle.keep("y", 3), Some(1), "hot is the oldest kept");
    }

    #[test]
    fn drain_takes_everything() {
        let mut idle = Idle::new(3);
        idle.keep("a", 1);
        idle.keep("b", 2);
        let mut all = idle.drain();
        all.sort_unstable();
        assert_eq!(all, vec![1, 2]);
        assert_eq!(idle.len(), 0);
        assert_eq!(idle.take("a"), None);
    }
}
