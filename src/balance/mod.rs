//! Balancing: which Ready connection a call goes to.
//!
//! The registry publishes an immutable [`Picker`] over the Ready connections whenever that set
//! changes; a pick reads it without a lock (round robin is one `fetch_add` on a shared cursor).
//! Policies other than round robin (least request, PeakEWMA, pick first) will live here, each
//! building its own picker from the endpoint set.

// `pub` (not `pub(crate)`) so that the benches can reach them through `__bench`.
#![allow(unreachable_pub)]

mod picker;

pub use picker::{Pickable, Picker};
