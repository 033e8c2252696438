#!/usr/bin/env python3
"""Breaks each protocol on purpose and checks that a loom model catches it.

For every mutant below: apply one textual edit to the protocol in a scratch
copy of the crate, build the named loom test, run the named model, and
require it to FAIL. A mutant that survives (its model passes) means a loom
model we still owe, and this script exits non-zero. An edit whose text is no
longer found exactly once also fails, so the list cannot silently go stale
when the code changes.

Usage: python3 scripts/loom-mutants.py [NAME_SUBSTRING]

How it saves time, without running less:
- The mutants build in the loom suite's target directory (release, under
  `--cfg toctou_loom`), so the dependencies it built are built already.
- One scratch copy serves every mutant: the edit is applied, the test binary
  built, and the edit undone again. The builds are incremental, and our
  packages are built at opt-level 0, so each takes about a second.
- Mutants that make the same edit share one build.
- A built test binary is copied aside and run there, while the next mutant
  builds: the runs (one model each, one thread) overlap the builds, in as
  many lanes as the machine has cores.
Every mutant is still built from its own edit and its named model run to
the end; nothing is skipped because it passed before.

The copy's package version carries build metadata (`0.1.0+loom-mutant`), so
that cargo gives its artifacts names of their own: a mutant can never pass
for the current build of the real crate.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Edits used by more than one mutant: (old text, new text).
# The seeds' bug: the EMPTY->RUNNING compare-exchange split into a check and an act.
CHECK_THEN_ACT = (
    """        match self
            .state
            .compare_exchange(EMPTY, RUNNING, Ordering::Acquire, Ordering::Acquire)
        {""",
    """        let seen = self.state.load(Ordering::Acquire);
        let claimed = if seen == EMPTY {
            self.state.store(RUNNING, Ordering::Relaxed);
            Ok(seen)
        } else {
            Err(seen)
        };
        match claimed {""",
)
# SingletonMap's version of the seeds' bug: unlock between the check and the insert.
MAP_CHECK_THEN_ACT = (
    "        let Some(entry) = shard.pending.find(hash, key) else {\n"
    "            let init = SharedInit::new();\n",
    "        let Some(entry) = shard.pending.find(hash, key) else {\n"
    "            drop(shard);\n"
    "            let mut shard = self.table.write(hash);\n"
    "            let init = SharedInit::new();\n",
)
# A failed or cancelled init that never gives the RUNNING claim back.
NO_GIVE_BACK = ("        self.once.finish(EMPTY);\n", "")

# The keyed core's sweep, killing an entry that has no holder but has waiters
# or spinners (the check of the whole word, `SLOW` bit included, skipped).
KEYED_KILL_OLD = (
    "                    if slot\n"
    "                        .as_ref()\n"
    "                        .word\n"
    "                        .compare_exchange(0, DEAD, Ordering::Acquire, Ordering::Relaxed)\n"
    "                        .is_ok()\n"
)
KEYED_KILL_NEW = (
    "                    let seen = slot.as_ref().word.load(Ordering::Relaxed);\n"
    "                    if seen & HOLDERS == 0\n"
    "                        && slot\n"
    "                        .as_ref()\n"
    "                        .word\n"
    "                        .compare_exchange(seen, DEAD, Ordering::Acquire, Ordering::Relaxed)\n"
    "                        .is_ok()\n"
)

# (name, file, old text, new text, loom test target, test name filter)
MUTANTS = [
    (
        "seed bug: check-then-act instead of the EMPTY->RUNNING compare-exchange",
        "src/once.rs",
        *CHECK_THEN_ACT,
        "loom_singleton",
        "two_threads_race_get_or_init",
    ),
    (
        "seed bug again, against set() racing get_or_init()",
        "src/once.rs",
        *CHECK_THEN_ACT,
        "loom_singleton",
        "set_races_get_or_init",
    ),
    (
        "fast path load weakened from Acquire to Relaxed",
        "src/once.rs",
        "self.state.load(Ordering::Acquire) == READY",
        "self.state.load(Ordering::Relaxed) == READY",
        "loom_singleton",
        "two_threads_race_get_or_init",
    ),
    (
        "finish() forgets to wake parked waiters",
        "src/once.rs",
        "            self.waiters.notify_all();\n",
        "",
        "loom_singleton",
        "waiter_parks_and_is_woken",
    ),
    (
        "waiter parks without re-checking the state under the queue lock",
        "src/once.rs",
        "        self.flag_waiter(|state| state & STATE_MASK != RUNNING)\n",
        "        self.flag_waiter(|_| false)\n",
        "loom_singleton",
        "waiter_parks_and_is_woken",
    ),
    (
        "wait queue evaluates should_park before taking the lock",
        "src/wait.rs",
        """        let id = {
            let mut list = self.list.lock();
            if !should_park() {
                return;
            }""",
        """        let park = should_park();
        let id = {
            let mut list = self.list.lock();
            if !park {
                return;
            }""",
        "loom_singleton",
        "waiter_parks_and_is_woken",
    ),
    (
        "wait(): claiming an EMPTY cell drops the parked waiters' WAITERS bit",
        "src/once.rs",
        "                RUNNING | WAITERS,\n",
        "                RUNNING,\n",
        "loom_singleton",
        "wait_outlasts_a_failed_init",
    ),
    (
        "failed init does not give the claim back (stays RUNNING)",
        "src/once.rs",
        *NO_GIVE_BACK,
        "loom_singleton",
        "failing_init_then_successful_init",
    ),
    (
        "cancelled async init does not give the claim back",
        "src/once.rs",
        *NO_GIVE_BACK,
        "loom_singleton",
        "async_init_dropped_mid_init_async_takes_over",
    ),
    (
        "async waiter is not re-registered with a waker (lost wake-up)",
        "src/wait.rs",
        "                this.id = Some(list.push(Unpark::Task(cx.waker().clone()), ()));\n",
        "                this.id = Some(list.push(Unpark::current_thread(), ()));\n",
        "loom_singleton",
        "sync_and_async_callers_race",
    ),
    (
        "SingletonMap: shard lock released between 'key absent' and 'insert Pending'",
        "src/singleton_map.rs",
        *MAP_CHECK_THEN_ACT,
        "loom_singleton_map",
        "two_threads_coalesce_on_one_key",
    ),
    (
        "SingletonMap: the same check-then-act, with three callers",
        "src/singleton_map.rs",
        *MAP_CHECK_THEN_ACT,
        "loom_singleton_map",
        "three_threads_coalesce_on_one_key",
    ),
    (
        "SingletonMap: initialiser runs under the shard's read lock",
        "src/singleton_map.rs",
        "                        let _mark = reentry::Mark::enter(claim.addr());\n",
        "                        let _mark = reentry::Mark::enter(claim.addr());\n"
        "                        let _held = self.table.read(hash);\n",
        "loom_singleton_map",
        "different_keys_do_not_wait_for_each_other",
    ),
    (
        "SingletonMap: remove treats an init in flight as absent",
        "src/singleton_map.rs",
        "        let Some(entry) = shard.pending.find(hash, key) else {\n"
        "            return Removal::Done(None);\n",
        "        let Some(entry) = None::<&crate::table::Entry<K, Arc<Once>>> else {\n"
        "            return Removal::Done(None);\n",
        "loom_singleton_map",
        "remove_against_an_init_in_flight",
    ),
    (
        "SingletonMap: clear does not wait for inits in flight",
        "src/singleton_map.rs",
        "        shard.pending.iter().map(|e| Arc::clone(&e.value)).collect()\n",
        "        Vec::new()\n",
        "loom_singleton_map",
        "clear_against_an_init_in_flight",
    ),
    (
        "SingletonMap: clear_async does not wait for inits in flight",
        "src/singleton_map.rs",
        "        shard.pending.iter().map(|e| Arc::clone(&e.value)).collect()\n",
        "        Vec::new()\n",
        "loom_singleton_map",
        "clear_async_against_an_init_in_flight",
    ),
    (
        "SingletonMap: retain_async skips its wait for an init in flight",
        "src/singleton_map.rs",
        "                once.wait_async().await;\n",
        "                let _ = &once;\n",
        "loom_singleton_map",
        "clear_async_against_an_init_in_flight",
    ),
    (
        "SingletonMap: a failed claim leaves its Pending entry in the map",
        "src/singleton_map.rs",
        "                shard\n"
        "                    .pending\n"
        "                    .remove_by(self.hash, Self::is_ours(init.once()))\n"
        "            };\n",
        "                Some(()).filter(|_| shard.pending.len() > 0)\n"
        "            };\n",
        "loom_singleton_map",
        "failed_init_then_successful_init",
    ),
    (
        "SingletonMap: a cancelled claim never wakes its waiters",
        "src/singleton_map.rs",
        "            drop(init);\n            drop(removed);\n",
        "            std::mem::forget(init);\n            drop(removed);\n",
        "loom_singleton_map",
        "cancelled_async_init_sync_caller_takes_over",
    ),
    (
        "SingletonMap: a published value never wakes the waiters",
        "src/singleton_map.rs",
        "        init.complete();\n",
        "        std::mem::forget(init);\n",
        "loom_singleton_map",
        "two_threads_coalesce_on_one_key",
    ),
    (
        "SingletonMap: an async waiter never registers on the Once (lost wake-up on takeover)",
        "src/singleton_map.rs",
        "                Step::Wait(once) => once.wait_async().await,\n",
        "                Step::Wait(once) => {\n"
        "                    let _ = &once;\n"
        "                    std::future::pending::<()>().await\n"
        "                }\n",
        "loom_singleton_map",
        "cancelled_async_init_async_waiter_takes_over",
    ),
    (
        "RegistryCell: first init without the re-check under the builder lock",
        "src/registry.rs",
        "        let builder = self.shared.builder.lock();\n        if self.shared.current.lock().is_some() {\n            return;\n        }\n",
        "        let builder = self.shared.builder.lock();\n",
        "loom_registry",
        "first_init_race",
    ),
    (
        "RegistryCell: reinit builds and publishes without holding the builder lock",
        "src/registry.rs",
        "        let builder = self.shared.builder.lock();\n        self.build_and_publish(settings, build, builder)\n",
        "        let builder = self.shared.builder.lock();\n        drop(builder);\n"
        "        let unlocked = crate::sync::Mutex::new(());\n"
        "        self.build_and_publish(settings, build, unlocked.lock())\n",
        "loom_registry",
        "two_reinits",
    ),
    (
        "RegistryCell: reinit_if_changed compares and builds under different locks",
        "src/registry.rs",
        "        }\n        let Ok(instance) = self.build_and_publish(settings, self.own_build(), builder);\n",
        "        }\n        drop(builder);\n        let builder = self.shared.builder.lock();\n"
        "        let Ok(instance) = self.build_and_publish(settings, self.own_build(), builder);\n",
        "loom_registry",
        "reinit_if_changed_with_equal_settings_builds_once",
    ),
    (
        "RegistryCell cache: a replaced instance freed while references still count in its block",
        "src/registry/cache.rs",
        "        if b.refs.load(Ordering::Relaxed) != 0 {\n            return None;\n        }\n",
        "",
        "loom_registry",
        "a_ref_held_across_its_own_threads_refresh",
    ),
    # No mutant for "a cache hit on the cell id alone, ignoring the
    # generation": since the sweep marks every older cached block `doomed`
    # before `reinit` returns, and a reader re-checks `doomed` after it
    # announces itself, such a hit backs off exactly where a stale read would
    # have happened. The mutant is equivalent; the generation compare stays as
    # the cheaper way to miss.
    (
        "RegistryCell cache: a refresh that never retires the block it replaces (lost track of)",
        "src/registry/cache.rs",
        "                .set(key, block)\n                .and_then(|old| unsafe { Block::retire(old) })\n",
        "                .set(key, block)\n                .and_then(|_old| None::<Count>)\n",
        "loom_registry",
        "a_ref_held_across_its_own_threads_refresh",
    ),
    (
        "RegistryCell sweep: the writer takes an instance back without the barrier",
        "src/registry/cache.rs",
        "    barrier::heavy();\n",
        "",
        "loom_registry",
        "a_reader_between_its_check_and_its_deref_races_a_reinit",
    ),
    (
        "RegistryCell cache: the reader skips its re-check after announcing itself",
        "src/registry/cache.rs",
        "    if b.doomed.load(Ordering::Relaxed) {\n"
        "        // SAFETY: we just counted this reference; the block is alive.\n"
        "        unsafe { unpin(block) };\n"
        "        return false;\n"
        "    }\n",
        "",
        "loom_registry",
        "a_reader_between_its_check_and_its_deref_races_a_reinit",
    ),
    (
        "RegistryCell sweep: takes back a block that a reference holds",
        "src/registry/cache.rs",
        "            if ours && b.refs.load(Ordering::Acquire) == 0 {\n",
        "            if ours {\n",
        "loom_registry",
        "a_reader_between_its_check_and_its_deref_races_a_reinit",
    ),
    (
        "RegistryCell cache: the last reference drops without checking doomed (an idle cache pins the instance)",
        "src/registry/cache.rs",
        "    if b.doomed.load(Ordering::Relaxed) {\n"
        "        // SAFETY: alive, this thread's, in its entry, unreferenced.\n",
        "    if false {\n"
        "        // SAFETY: alive, this thread's, in its entry, unreferenced.\n",
        "loom_registry",
        "an_idle_cached_thread_does_not_keep_a_replaced_instance",
    ),
    (
        "RegistryCell cache: a fill caches without re-checking the generation under the record's lock",
        "src/registry/cache.rs",
        "            if generation.load(Ordering::Acquire) != key.generation {\n",
        "            if false {\n",
        "loom_registry",
        "an_idle_cached_thread_does_not_keep_a_replaced_instance",
    ),
    (
        "RegistryCell cache: a freed block gives its count back although a sweep stole it",
        "src/registry/cache.rs",
        "        (!stolen).then_some(Count {\n",
        "        (!stolen || true).then_some(Count {\n",
        "loom_registry",
        "counts_are_given_back_exactly_once",
    ),
    (
        "RegistryCell sweep: steals without marking the block stolen",
        "src/registry/cache.rs",
        "std::mem::replace(&mut *stolen, true)",
        "std::mem::replace(&mut *stolen, false)",
        "loom_registry",
        "counts_are_given_back_exactly_once",
    ),
    (
        "RegistryCell: a dropped cell leaves its instance in idle threads' caches",
        "src/registry.rs",
        "            cache::reclaim(id, u64::MAX)\n",
        "            Vec::<cache::Count>::new()\n",
        "loom_registry",
        "dropping_the_cell_takes_its_instance_back_from_idle_caches",
    ),
    (
        "keyed: take the key without checking that it is free",
        "src/keyed/core.rs",
        "            if may_take && L::can_acquire(word & HOLDERS, mode) {",
        "            if may_take {",
        "loom_keyed_locks",
        "two_threads_exclude_each_other_on_one_key",
    ),
    (
        "keyed seed bug: a second entry (a second lock) for a key that already has one",
        "src/keyed/core.rs",
        "                    && slot.key.borrow() == key\n",
        "                    && false\n",
        "loom_keyed_locks",
        "last_release_races_a_lookup_of_the_same_key",
    ),
    (
        "keyed removal race: a sweep kills an entry that has no holder but has a waiter",
        "src/keyed/core.rs",
        KEYED_KILL_OLD,
        KEYED_KILL_NEW,
        "loom_keyed_locks",
        "a_sweep_beside_a_waiter_spares_its_entry",
    ),
    (
        "keyed: release forgets to dispatch the queue (lost wake-up)",
        "src/keyed/core.rs",
        "        let mut wakes = Wakes::default();\n"
        "        dispatch::<L>(&s.word, state, &mut wakes);\n"
        "        s.settle(state);\n"
        "        drop(shard);\n",
        "        let mut wakes = Wakes::default();\n"
        "        s.settle(state);\n"
        "        drop(shard);\n",
        "loom_keyed_locks",
        "a_waiter_queues_while_the_holder_releases",
    ),
    (
        "keyed: a cancelled waiter leaves the queue without passing its wake-up on",
        "src/keyed/core.rs",
        "            // behind us, or woken to take a free lock: pass it on.\n"
        "            dispatch::<L>(&s.word, state, &mut wakes);\n",
        "",
        "loom_keyed_locks",
        "a_woken_async_waiter_cancels_and_the_next_one_is_woken",
    ),
    (
        "keyed rw: a cancelled writer does not let the readers queued behind it in",
        "src/keyed/core.rs",
        "            // behind us, or woken to take a free lock: pass it on.\n"
        "            dispatch::<L>(&s.word, state, &mut wakes);\n",
        "",
        "loom_keyed_locks",
        "a_cancelled_writer_lets_the_readers_behind_it_in",
    ),
    (
        "keyed: a dropped future does not release a key handed to it",
        "src/keyed/core.rs",
        "            Check::Granted => unsafe { self.core.release(self.slot, self.mode) },",
        "            Check::Granted => {}",
        "loom_keyed_locks",
        "an_async_waiter_dropped_after_a_handoff_releases_the_key",
    ),
    (
        "keyed: a timed-out waiter ignores that the key was handed to it",
        "src/keyed/core.rs",
        "            // Handed to us by `dispatch`.\n",
        "            if give_up && !cancelled {\n"
        "                return Check::GaveUp;\n"
        "            }\n",
        "loom_keyed_locks",
        "try_lock_for_against_barging_with_a_handoff_at_the_deadline",
    ),
    (
        "keyed: a handoff grants the key but wakes nobody",
        "src/keyed/core.rs",
        "        wakes.push(waiter.unpark);\n",
        "",
        "loom_keyed_locks",
        "handoff_after_repeated_barging",
    ),
    (
        "keyed lock-free: a fast acquire takes a dead entry (the increment ignores DEAD)",
        "src/keyed/core.rs",
        "            if word & (DEAD | SLOW) != 0 {\n",
        "            if word & SLOW != 0 {\n",
        "loom_keyed_locks",
        "a_sweep_races_a_lookup_of_the_key_it_kills",
    ),
    (
        "keyed lock-free: a sweep unlinks the key's live entry (by key) instead of the dead one (by identity)",
        "src/keyed/core.rs",
        "            let unlinked = unsafe { index.unlink(occupancy, s.hash, slot) };\n",
        "            let by_key = unsafe { Self::find(lock_free, s.hash, &s.key) }.map_or(slot, |f| f.0);\n"
        "            let unlinked = unsafe { index.unlink(occupancy, s.hash, by_key) };\n",
        "loom_keyed_locks",
        "a_sweep_races_a_lookup_of_the_key_it_kills",
    ),
    (
        "keyed lock-free: a sweep frees the entries it killed at once, not after the pinned lookups",
        "src/keyed/core.rs",
        "        unsafe { lock_free.reclaim.retire(slots.chain(cells)) };\n",
        "        unsafe { reclaim::free_all(slots.chain(cells)) };\n",
        "loom_keyed_locks",
        "a_sweep_races_a_lookup_of_the_key_it_kills",
    ),
    (
        "keyed lock-free: a waiter sets SLOW and queues without re-checking the word (lost wake-up)",
        "src/keyed/core.rs",
        "            match s.word.compare_exchange_weak(\n"
        "                word,\n"
        "                word | SLOW,\n"
        "                Ordering::Relaxed,\n"
        "                Ordering::Relaxed,\n"
        "            ) {\n"
        "                Ok(_) => break,\n"
        "                Err(seen) => word = seen,\n"
        "            }\n",
        "            s.word.fetch_or(SLOW, Ordering::Relaxed);\n"
        "            break;\n",
        "loom_keyed_locks",
        "a_waiter_queues_while_the_holder_releases",
    ),
    (
        "keyed lock-free: an advance of the epoch ignores the pinned readers",
        "src/keyed/reclaim.rs",
        "            .any(|s| s.0[side].load(Ordering::Acquire) != 0)\n",
        "            .any(|s| s.0[side].load(Ordering::Acquire) == usize::MAX)\n",
        "loom_keyed_locks",
        "a_sweep_races_a_lookup_of_the_key_it_kills",
    ),
    (
        "keyed: lock_many takes the keys in the given order, not sorted",
        "src/keyed/locks.rs",
        "    keys.sort_unstable();\n",
        "",
        "loom_keyed_locks",
        "lock_many_in_opposite_orders_does_not_deadlock",
    ),
    (
        "FileLocks: no inode re-check after locking",
        "src/file/protocol.rs",
        "        let verified = is_at_name(fs, name, &fd)?;\n",
        "        let verified = true;\n",
        "loom_file_locks",
        "two_processes_lock_release_and_delete",
    ),
    (
        "FileLocks: no inode re-check after locking, three processes",
        "src/file/protocol.rs",
        "        let verified = is_at_name(fs, name, &fd)?;\n",
        "        let verified = true;\n",
        "loom_file_locks",
        "three_processes_lock_release_and_delete",
    ),
    (
        "FileLocks: a kept descriptor trusted without the re-check of the name",
        "src/file/protocol.rs",
        "            Some(fd) => fd,\n",
        "            Some(fd) => {\n"
        "                let held = fs.lock(&fd, mode, wait == Wait::Block).map_err(at(\"lock\"))?;\n"
        "                return Ok(held.then_some(fd));\n"
        "            }\n",
        "loom_file_locks",
        "a_kept_descriptor_races_prune",
    ),
    (
        "FileLocks: unlock before unlink",
        "src/file/protocol.rs",
        "            Ok(true) => fs.unlink_at(name).map_err(at(\"unlink\")),\n",
        "            Ok(true) => fs\n"
        "                .unlock(&fd)\n"
        "                .map_err(at(\"unlock\"))\n"
        "                .and_then(|()| fs.unlink_at(name).map_err(at(\"unlink\"))),\n",
        "loom_file_locks",
        "two_processes_lock_release_and_delete",
    ),
    (
        "FileLocks: prune unlinking without holding the lock",
        "src/file/protocol.rs",
        "    let held = !fs.lock(&fd, Mode::Exclusive, false).map_err(at(\"lock\"))?;\n",
        "    let held = false;\n",
        "loom_file_locks",
        "prune_races_a_locker",
    ),
    (
        "FileLocks: a shared holder unlinking without the upgrade",
        "src/file/protocol.rs",
        "            Mode::Shared => match fs.lock(&fd, Mode::Exclusive, false) {\n",
        "            Mode::Shared => match Ok::<bool, io::Error>(true) {\n",
        "loom_file_locks",
        "shared_holders_and_an_exclusive_one",
    ),
    (
        "FileLocks: a shared holder's upgrade without the re-check of the name",
        "src/file/protocol.rs",
        "                Ok(true) => is_at_name(fs, name, &fd),\n",
        "                Ok(true) => Ok(true),\n",
        "loom_file_locks",
        "shared_holders_and_an_exclusive_one",
    ),
    (
        "FileLocks hand-over: the lock is parked for a task at the front",
        "src/keyed/core.rs",
        "matches!(front.unpark, Unpark::Thread(_)) && L::is_exclusive(front.data.mode)",
        "L::is_exclusive(front.data.mode)",
        "loom_file_locks",
        "a_waiting_task_is_not_handed_the_lock",
    ),
    (
        "FileLocks hand-over: an exclusive taker ignores the parked lock",
        "src/file/layer.rs",
        "        match key.key().take_parked() {\n",
        "        match None::<Box<OsLock<F>>> {\n",
        "loom_file_locks",
        "a_hand_over_and_another_process",
    ),
    (
        "FileLocks hand-over: a reader ignores the parked exclusive lock",
        "src/file/layer.rs",
        "        if let Some(os) = key.key().take_parked() {\n",
        "        if let Some(os) = None::<Box<OsLock<F>>> {\n",
        "loom_file_locks",
        "a_reader_handed_an_exclusive_lock_gives_it_up",
    ),
    (
        "keyed spinning: a release lets the entry a thread spins for go idle (a sweep then kills it)",
        "src/keyed/core.rs",
        "        !self.queue.is_empty() || self.spinning > 0\n",
        "        !self.queue.is_empty()\n",
        "loom_keyed_locks",
        "a_sweep_beside_a_counted_spinner_spares_its_entry",
    ),
    (
        "keyed spinning: a spinner takes the key without uncounting itself",
        "src/keyed/core.rs",
        "                        if spin == Some(true) {\n"
        "                            state.stop_spinning(L::is_exclusive(mode), &s.spinning_hint);\n"
        "                            s.settle(state);\n"
        "                        }\n",
        "",
        "loom_keyed_locks",
        "counted_spinners_keep_the_entry_until_they_take_the_key_or_queue",
    ),
    (
        "keyed spinning: a spinner queues without uncounting itself",
        "src/keyed/core.rs",
        "        if spin == Some(true) {\n"
        "            state.stop_spinning(L::is_exclusive(mode), &s.spinning_hint);\n"
        "        }\n"
        "        let id = state.queue.push(\n",
        "        let id = state.queue.push(\n",
        "loom_keyed_locks",
        "counted_spinners_keep_the_entry_until_they_take_the_key_or_queue",
    ),
    (
        # A fresh subscription before each wait: what was announced between
        # the failed tries and the wait is lost with the first one.
        "toctou-postgres: subscribing to announcements after the failed tries",
        "postgres/src/protocol.rs",
        "        contact.tried(&mut subscription);\n",
        "        subscription = contact.subscribe();\n"
        "        contact.tried(&mut subscription);\n",
        "toctou-postgres:loom_pg_protocol",
        "a_release_wakes_a_waiter_that_just_failed_its_try",
    ),
    (
        "toctou-postgres: no second try between registering and waiting",
        "postgres/src/protocol.rs",
        "            registration = contact.register(key).await?;\n"
        "            continue;\n",
        "            registration = contact.register(key).await?;\n",
        "toctou-postgres:loom_pg_protocol",
        "a_release_wakes_a_waiter_that_just_failed_its_try",
    ),
    (
        "toctou-postgres: a wait skips its own key's announcement",
        "postgres/src/protocol.rs",
        "                Event::Announced(other) if other != attempt.advisory => continue,\n",
        "                Event::Announced(other) if other == attempt.advisory => continue,\n",
        "toctou-postgres:loom_pg_protocol",
        "a_release_wakes_a_waiter_that_just_failed_its_try",
    ),
    (
        "toctou-postgres: a wait gives up on another key's announcement",
        "postgres/src/protocol.rs",
        "                Event::Announced(other) if other != attempt.advisory => continue,\n",
        "                Event::Announced(other) if other != attempt.advisory => return Ok(None),\n",
        "toctou-postgres:loom_pg_protocol",
        "waiters_skip_other_keys_announcements",
    ),
    (
        "keyed rw: a writer is granted while readers hold the key",
        "src/keyed/kind.rs",
        "            Access::Write => holders == 0,",
        "            Access::Write => holders & HELD == 0,",
        "loom_keyed_locks",
        "readers_and_a_writer",
    ),
]


# What a scratch copy holds. Cargo.toml names the workspace members
# (benches, proptests, ...): each must exist in the copy, or cargo cannot
# load the workspace.
ENTRIES = ("Cargo.toml", "Cargo.lock", "README.md", "src", "loom-tests", "benches",
           "proptests", "tests", "examples", "postgres")
# The package directory of each package a mutant's test can name, for the
# working directory of its run (as `cargo test` would set it).
PACKAGE_DIRS = {"": ".", "toctou-postgres": "postgres"}
# The packages a mutant edits, by the folder their sources are in: built at
# opt-level 0 (see build()), and the edited one must be rebuilt every time.
OUR_PACKAGES = {"toctou-postgres": "postgres/", "toctou": ""}
# The models whose runs take longest (over a minute at opt-level 0, against a
# few seconds for the others): they build and run first, so that all the
# other builds overlap their runs.
LONG_MODELS = ("a_reader_handed_an_exclusive_lock_gives_it_up",)
TIMEOUT = 900
# The version suffix that makes the scratch copy a package of its own.
SUFFIX = "+loom-mutant"


def make_scratch(scratch):
    """Copies the crate to `scratch`, as a package cargo cannot mistake for ours."""
    os.makedirs(scratch)
    for entry in ENTRIES:
        src = os.path.join(ROOT, entry)
        # Copied with fresh modification times: whatever an earlier run left
        # in the target directory is older than every file, so the first
        # build recompiles every package of the workspace.
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(scratch, entry), copy_function=shutil.copy,
                            ignore=shutil.ignore_patterns("target"))
        elif os.path.exists(src):
            shutil.copy(src, os.path.join(scratch, entry))
    # The mutants build in the loom suite's target directory, to reuse its
    # dependencies (loom, tokio-postgres, ...). Cargo names a path package's
    # artifacts by its id, not by where it lives, so an unchanged copy of the
    # crate would share our artifacts, and a mutant would then pass for the
    # current build of the real crate. Build metadata in the version makes
    # the copy a package of its own, and every package that depends on it.
    # The lock file says the same, so that the copy builds `--locked`: with
    # exactly the dependencies the loom suite built.
    manifest = os.path.join(scratch, "Cargo.toml")
    version = tomllib.load(open(manifest, "rb"))["package"]["version"]
    replace_once(manifest, f'\n[package]\nname = "toctou"\nversion = "{version}"\n',
                 f'\n[package]\nname = "toctou"\nversion = "{version}{SUFFIX}"\n')
    replace_once(os.path.join(scratch, "Cargo.lock"),
                 f'\nname = "toctou"\nversion = "{version}"\n',
                 f'\nname = "toctou"\nversion = "{version}{SUFFIX}"\n')


def replace_once(path, old, new):
    text = open(path).read()
    if text.count(old) != 1:
        sys.exit(f"{path}: {old!r} is not found exactly once")
    open(path, "w").write(text.replace(old, new))


def group_mutants(mutants):
    """One group per distinct edit and package: [((path, old, new, package), [mutant])]."""
    groups = {}
    for mutant in mutants:
        _name, path, old, new, test, _filt = mutant
        package = test.rpartition(":")[0]
        groups.setdefault((path, old, new, package), []).append(mutant)
    # sorted() is stable: the others keep the order of MUTANTS.
    return sorted(groups.items(), key=lambda item: not any(m[5] in LONG_MODELS for m in item[1]))


def edited_package(path):
    return next(name for name, folder in OUR_PACKAGES.items() if path.startswith(folder))


def build(scratch, target_dir, package, tests, edited):
    """Builds the named test targets; returns ({test: executable}, error text).

    `edited` names the package whose source the edit changed (None for the
    unedited control build): cargo must have rebuilt its library and every
    test, or what runs would be an earlier build.
    """
    # The loom suite's profile, made incremental: between two mutants only one
    # source file changes, so a rebuild redoes only what that file feeds.
    env = dict(os.environ, RUSTFLAGS="--cfg toctou_loom", CARGO_TARGET_DIR=target_dir,
               CARGO_INCREMENTAL="1")
    # Our packages at opt-level 0 (their dependencies, loom included, stay as
    # the loom suite optimized them): loom explores the same executions at
    # any optimization level, and a rebuild takes about a second, not five.
    # The control run (main()) checks that every model passes when built so.
    cmd = ["cargo", "test", "--release", "--locked", "--no-run",
           "--message-format=json-render-diagnostics"]
    cmd += [arg for name in OUR_PACKAGES
            for arg in ("--config", f"profile.release.package.{name}.opt-level=0")]
    cmd += ["-p", package] if package else []
    for test in sorted(set(tests)):
        cmd += ["--test", test]
    # A session of its own: on a timeout, cargo and its rustc processes stop together.
    proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"the build ran past {TIMEOUT} s"
    except BaseException:
        # Interrupted (Ctrl-C): the build of a mutant must not go on without us.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    exes, rebuilt_libs = {}, set()
    for line in stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact":
            continue
        target = msg["target"]
        if not msg["fresh"] and "lib" in target["kind"]:
            rebuilt_libs.add(target["name"])
        if msg.get("executable") and "test" in target["kind"]:
            if edited and msg["fresh"]:
                return None, f"cargo did not rebuild test {target['name']} after the edit"
            exes[target["name"]] = msg["executable"]
    if proc.returncode != 0 or not set(tests) <= set(exes):
        return None, stderr[-3000:]
    lib = edited.replace("-", "_") if edited else None
    if lib and lib not in rebuilt_libs:
        return None, f"cargo did not rebuild the library {lib} after the edit"
    return exes, None


def run(exe, cwd, filt):
    """Runs one model of a built test binary; returns (exit code, output, seconds)."""
    start = time.monotonic()
    try:
        # --nocapture: a panic's message is printed when it happens, not by
        # the harness at the end, which a crash after it would never reach.
        proc = subprocess.run([exe, "--exact", filt, "--nocapture"], cwd=cwd, capture_output=True,
                              text=True, timeout=TIMEOUT)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        code, out = None, f"ran past {TIMEOUT} s"
    return code, out, time.monotonic() - start


def model_failed(code, out, filt):
    """Whether the model itself failed: a panic in the test (a loom failure is
    one), reported by the test harness, or followed by an abort (a second
    panic while unwinding). A crash, a stack overflow (loom's threads run on
    small stacks) or a time-out is not the model catching anything."""
    if "overflowed its stack" in out or "panicked at" not in out:
        return False
    return (code == 101 and f"test {filt} ... FAILED" in out) or code == -signal.SIGABRT


def ran_one_model(out):
    """Whether the run found exactly one test to run (a filter with a typo
    finds none, and passes)."""
    return "\nrunning 1 test\n" in out


def verdict(mutant, code, out, secs):
    name, _path, _old, _new, test, filt = mutant
    test = test.rpartition(":")[2]
    if not ran_one_model(out):
        return False, f"BROKEN   {name}: no model of {test} is named {filt}"
    if code == 0:
        return False, f"SURVIVED {name}: {test}::{filt} passed on broken code"
    if not model_failed(code, out, filt):
        return False, (f"BROKEN   {name}: {test}::{filt} ended with exit {code} without "
                       f"failing the model\n{out[-2000:]}")
    lines = out.splitlines()
    at = next((i for i, line in enumerate(lines) if "panicked at" in line), None)
    reason = lines[at + 1].strip() if at is not None and at + 1 < len(lines) else "test failed"
    return True, f"caught   {name}\n         by {test}::{filt} in {secs:.1f} s: {reason[:160]}"


def stamp(path, after_ns):
    """Sets `path`'s modification time to now, and at least 2 s after `after_ns`
    (when the last build started), so that cargo sees it changed even on a
    file system with coarse timestamps."""
    when = max(time.time_ns(), after_ns + 2_000_000_000)
    os.utime(path, ns=(when, when))


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    mutants = [m for m in MUTANTS if only in m[0]]
    target_dir = os.path.abspath(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")))
    ok = True
    # Every edit must apply to today's code before anything is built.
    for name, path, old, _new, _test, _filt in mutants:
        if open(os.path.join(ROOT, path)).read().count(old) != 1:
            print(f"STALE    {name}: the text to break is not found exactly once in {path}")
            ok = False
    if not ok:
        sys.exit(1)
    lanes = os.cpu_count() or 1
    started = time.monotonic()
    build_secs = 0.0
    groups = group_mutants(mutants)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(lanes) as pool:
        scratch = os.path.join(tmp, "crate")
        make_scratch(scratch)

        def build_and_copy(index, package, tests, edited):
            """Builds; copies each test binary aside (the next build overwrites it)."""
            nonlocal build_secs
            began = time.monotonic()
            exes, error = build(scratch, target_dir, package, tests, edited)
            build_secs += time.monotonic() - began
            if exes is None:
                return None, error
            copies = {}
            for test, exe in exes.items():
                copies[test] = os.path.join(tmp, f"{index}-{test}")
                shutil.copy2(exe, copies[test])
            return copies, None

        # The control: every model a mutant names must pass on the unedited
        # copy, built exactly as the mutants are. Its runs start first.
        controls = []
        models = {}
        for _, group in groups:
            for mutant in group:
                package, _, test = mutant[4].rpartition(":")
                models.setdefault((package, test, mutant[5]), None)
        for package in dict.fromkeys(package for package, _, _ in models):
            tests = [test for p, test, _ in models if p == package]
            exes, error = build_and_copy(f"control{package}", package, tests, None)
            if exes is None:
                sys.exit(f"BROKEN   the unedited copy does not build\n{error}")
            cwd = os.path.join(scratch, PACKAGE_DIRS[package])
            for p, test, filt in sorted(models, key=lambda m: m[2] not in LONG_MODELS):
                if p == package:
                    controls.append((test, filt, pool.submit(run, exes[test], cwd, filt)))
        print(f"built    the unedited copy; its {len(controls)} models run first", flush=True)

        runs = []
        last_build_ns = 0
        for index, ((path, old, new, package), group) in enumerate(groups):
            file = os.path.join(scratch, path)
            text = open(file).read()
            if text.count(old) != 1:
                sys.exit(f"{file}: the edit of {group[0][0]!r} does not apply to the copy")
            open(file, "w").write(text.replace(old, new))
            stamp(file, last_build_ns)
            last_build_ns = time.time_ns()
            began = time.monotonic()
            try:
                exes, error = build_and_copy(index, package,
                                             [m[4].rpartition(":")[2] for m in group],
                                             edited_package(path))
            finally:
                # Undone before the next edit; the next build recompiles it.
                open(file, "w").write(text)
                stamp(file, last_build_ns)
            print(f"built    {len(group)} mutant(s) of {path} in {time.monotonic() - began:.1f} s",
                  flush=True)
            if exes is None:
                for mutant in group:
                    print(f"BROKEN   {mutant[0]}: the mutant was not built\n{error}")
                ok = False
                continue
            cwd = os.path.join(scratch, PACKAGE_DIRS[package])
            for mutant in group:
                exe = exes[mutant[4].rpartition(":")[2]]
                runs.append((mutant, pool.submit(run, exe, cwd, mutant[5])))
        for test, filt, future in controls:
            code, out, secs = future.result()
            if code != 0 or not ran_one_model(out) or "test result: ok. 1 passed" not in out:
                ok = False
                print(f"BROKEN   control: {test}::{filt} fails on the unedited copy "
                      f"(exit {code})\n{out[-2000:]}")
        for mutant, future in runs:
            caught, line = verdict(mutant, *future.result())
            ok &= caught
            print(line, flush=True)
    print(f"{len(mutants)} mutants and {len(controls)} control models in "
          f"{time.monotonic() - started:.0f} s ({build_secs:.0f} s of builds, "
          f"runs overlapping them in {lanes} lanes)")
    print("all mutants caught" if ok else "some mutants were NOT caught")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
