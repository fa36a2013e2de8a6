//! # tonic-pool
//!
//! A connection pool for [tonic] clients: one handle, many HTTP/2 connections, always routed
//! to a live one.
//!
//! A tonic `Channel` holds one HTTP/2 connection. Behind a Kubernetes Service or an L4 load
//! balancer that pins every call to one backend and caps calls in flight at the server's
//! `MAX_CONCURRENT_STREAMS`. A [`Pool`] resolves its target, keeps N connections to every
//! resolved address, picks among the Ready ones with an atomic round-robin, replaces dead
//! connections in the background with gRPC connection backoff, and reports gRPC connectivity
//! states for the pool, each endpoint and each connection.
//!
//! ```no_run
//! use std::time::Duration;
//! use tonic_pool::{ConnectivityState, Pool};
//!
//! # async fn run() -> Result<(), tonic_pool::Error> {
//! let pool = Pool::builder("static:///127.0.0.2:50051,127.0.0.3:50051")
//!     .connections_per_endpoint(4)
//!     .build()?; // validates; starts connecting in the background
//! pool.wait_ready(Duration::from_secs(5)).await?;
//! // Any generated client takes the pool in place of a Channel:
//! // let mut client = EchoClient::new(pool.clone());
//! assert_eq!(pool.state(), ConnectivityState::Ready);
//! pool.close().await?;
//! # Ok(()) }
//! ```
//!
//! ## Design
//!
//! ```text
//! target ──parse──▶ Target ──▶ Resolve ──addresses──▶ worker ──▶ endpoints ──▶ connection slots
//!                                                        │        (one per       state machine, backoff,
//!                                                        │         address)      h2 + driver + frame watch
//!                                                        ▼
//!       generated client ──▶ Pool (Clone, tower::Service) ──▶ call ──pick──▶ picker (Ready, with room)
//! ```
//!
//! Layers point down only: the face ([`Pool`], [`PoolBuilder`]) → the call path (pick or
//! wait, attempt on h2, transparent retry) → the worker and the registry (the endpoint set,
//! states, the published picker) → one connection (state machine, connect, driver, frame
//! watch) → the leaves ([`connector`], [`resolve`], [`target`], [`state`], config, errors).
//! `ARCHITECTURE.md` in the repository gives each module's one job.
//!
//! - The worker (one task per pool) owns resolution and the connection slots; each slot owns
//!   one h2 connection (driven by its own task) and runs gRPC's state machine with its own
//!   backoff. Calls open their HTTP/2 streams from the caller's task.
//! - The registry keeps every state under one lock and republishes an immutable picker when
//!   the Ready set changes; a call's pick is lock- and allocation-free (round robin: one
//!   atomic `fetch_add`). [`Balance`] chooses the policy: round robin, least request,
//!   PeakEWMA or pick first, each per address first, then per connection.
//! - [`ConnectivityState`] mirrors gRPC's; see the [`state`] module for the diagram and the
//!   aggregation rules.
//!
//! [tonic]: https://docs.rs/tonic

// The face: what users hold.
mod builder;
mod pool;
// The call path, the balancer, the endpoint set and the one background task.
mod balance;
mod call;
mod endpoint;
mod growth;
mod mailbox;
mod registry;
mod worker;
// One connection.
mod conn;
// Leaves: every layer may use them.
mod backoff;
mod config;
pub mod connector;
mod error;
pub mod resolve;
pub mod state;
pub mod stream;
pub mod target;

#[cfg(test)]
mod test_io;
#[cfg(test)]
mod test_model;

/// Internals exposed for the criterion benches only (`--features bench-internals`); not a
/// stable API.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod __bench {
    pub use crate::balance::{Pickable, Picker};
}

/// Hooks for the fuzz targets in `fuzz/` (built with `--cfg fuzzing`); not an API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod __fuzz {
    /// Feeds `data` through the frame readers, split at the positions its first bytes name.
    pub fn feed_frames(data: &[u8]) {
        crate::conn::frames::fuzz_feed(data);
    }
}

pub use backoff::BackoffConfig;
pub use balance::Balance;
/// A boxed, sendable future, as resolvers ([`resolve::Resolve`]) and connectors
/// ([`connector::Connect`]) return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub use builder::PoolBuilder;
pub use call::{ResponseBody, WaitForReady};
pub use error::Error;
pub use pool::{Pool, ResponseFuture};
pub use state::{
    ConnectionSnapshot, ConnectivityState, EndpointSnapshot, PoolSnapshot, Scope, StateEvent,
    StateWatch,
};
pub use stream::{ResilientStream, StreamEvent};
pub use target::{Target, TargetError};
