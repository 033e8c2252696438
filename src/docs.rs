//! Background reading: how each primitive behaves in the corner cases, next
//! to the types it replaces, and what it costs.
//!
//! This module holds no code, only documentation, in the manner of
//! arc-swap's `docs` module:
//!
//! - [`semantics`]: panics, errors, cancellation, reentrancy, timeouts and
//!   removal, for every primitive, compared with `std`, once_cell, tokio,
//!   dashmap, moka, lockmap and arc-swap;
//! - [`performance`]: what the fast paths do, and a few measured ratios, with
//!   a link to the full benchmark report.

#[doc = include_str!("docs/semantics.md")]
pub mod semantics {}

#[doc = include_str!("docs/performance.md")]
pub mod performance {}
