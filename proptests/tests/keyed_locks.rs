//! `KeyedLocks` and `KeyedRwLocks` against a model: random single-threaded
//! sequences of `try_*` calls and guard drops, checked against which keys are
//! held, and how.
//!
//! This property test lives in its own workspace member so that proptest is
//! not a dev-dependency of the root package: `cargo run --example` compiles
//! every dev-dependency of the example's package. Run it with
//! `cargo test --workspace` (or `cargo test -p toctou-proptests`).

use std::collections::HashMap;

use proptest::prelude::*;
use toctou::{KeyedLocks, KeyedRwLocks};

#[derive(Debug, Clone)]
enum Op {
    TryLock(u8),
    TryRead(u8),
    TryWrite(u8),
    /// Drop the guard at this index (modulo the number of live guards).
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4).prop_map(Op::TryLock),
        (0u8..4).prop_map(Op::TryRead),
        (0u8..4).prop_map(Op::TryWrite),
        any::<usize>().prop_map(Op::Drop),
    ]
}

enum Guard<'a> {
    Lock(u8, toctou::KeyGuard<'a, u8>),
    Read(u8, toctou::KeyReadGuard<'a, u8>),
    Write(u8, toctou::KeyWriteGuard<'a, u8>),
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if cfg!(miri) { 4 } else { 256 },
        // Saving failing cases needs the working directory, which miri's
        // isolation hides.
        failure_persistence: if cfg!(miri) {
            None
        } else {
            ProptestConfig::default().failure_persistence
        },
        ..ProptestConfig::default()
    })]

    #[test]
    fn try_calls_succeed_exactly_when_the_model_allows(ops in prop::collection::vec(op(), 1..64)) {
        let locks = KeyedLocks::<u8>::new();
        let files = KeyedRwLocks::<u8>::new();
        let mut guards: Vec<Guard<'_>> = Vec::new();
        // The model: held mutex keys; per rw key, (readers, writer).
        let mut held: HashMap<u8, ()> = HashMap::new();
        let mut rw: HashMap<u8, (usize, bool)> = HashMap::new();
        for op in ops {
            match op {
                Op::TryLock(k) => {
                    let got = locks.try_lock(&k);
                    prop_assert_eq!(got.is_some(), !held.contains_key(&k));
                    if let Some(g) = got {
                        held.insert(k, ());
                        guards.push(Guard::Lock(k, g));
                    }
                }
                Op::TryRead(k) => {
                    let got = files.try_read(&k);
                    let state = rw.get(&k).copied().unwrap_or((0, false));
                    prop_assert_eq!(got.is_some(), !state.1);
                    if let Some(g) = got {
                        rw.entry(k).or_default().0 += 1;
                        guards.push(Guard::Read(k, g));
                    }
                }
                Op::TryWrite(k) => {
                    let got = files.try_write(&k);
                    let state = rw.get(&k).copied().unwrap_or((0, false));
                    prop_assert_eq!(got.is_some(), state == (0, false));
                    if let Some(g) = got {
                        rw.entry(k).or_default().1 = true;
                        guards.push(Guard::Write(k, g));
                    }
                }
                Op::Drop(i) => {
                    if guards.is_empty() {
                        continue;
                    }
                    match guards.remove(i % guards.len()) {
                        Guard::Lock(k, g) => {
                            drop(g);
                            held.remove(&k);
                        }
                        Guard::Read(k, g) => {
                            drop(g);
                            let s = rw.get_mut(&k).unwrap();
                            s.0 -= 1;
                            if *s == (0, false) {
                                rw.remove(&k);
                            }
                        }
                        Guard::Write(k, g) => {
                            drop(g);
                            rw.remove(&k);
                        }
                    }
                }
            }
            prop_assert_eq!(locks.len(), held.len());
            prop_assert_eq!(files.len(), rw.len());
            for k in 0..4 {
                prop_assert_eq!(locks.is_locked(&k), held.contains_key(&k));
                prop_assert_eq!(files.is_locked(&k), rw.contains_key(&k));
            }
        }
        drop(guards);
        prop_assert_eq!(locks.len(), 0);
        prop_assert_eq!(files.len(), 0);
    }
}
