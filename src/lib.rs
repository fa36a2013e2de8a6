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
//! ## Interceptors and tower layers
//!
//! Everything a generated client does with a `Channel` it does with a pool:
//! `GreeterClient::with_interceptor(pool, f)`, `with_origin` (as with a `Channel`, the
//! request's scheme and authority are the pool's: set them with [`PoolBuilder::origin`]),
//! `send_compressed`/`accept_compressed`, `max_decoding_message_size`. An interceptor is
//! tonic's `InterceptedService` around the pool, which is what `with_interceptor` builds:
//!
//! ```no_run
//! use tonic::service::interceptor::InterceptedService;
//! use tonic_pool::Pool;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::builder("dns:///api.internal:50051").build()?;
//! let token: tonic::metadata::MetadataValue<_> = "Bearer my-token".parse()?;
//! let authed = InterceptedService::new(pool, move |mut req: tonic::Request<()>| {
//!     req.metadata_mut().insert("authorization", token.clone());
//!     Ok(req)
//! });
//! // A generated client takes it in place of the pool (`GreeterClient::new(authed)`), as
//! // tonic's own client does:
//! let mut grpc = tonic::client::Grpc::new(authed);
//! grpc.ready().await?;
//! # Ok(()) }
//! ```
//!
//! tower layers go around the pool as around a `Channel` (`tower::ServiceBuilder`'s
//! `timeout`, `concurrency_limit`, `rate_limit`; the pool's own [`PoolBuilder::timeout`] and
//! a call's `grpc-timeout` give DEADLINE_EXCEEDED where tower's timeout gives UNKNOWN).
//! `tower::retry` needs a request it can clone, which an HTTP request with a streaming body
//! is not: retry idempotent calls one level up, around a `tower::service_fn` that calls the
//! generated client with the (cloneable) message. The integration tests in
//! `tests/it/generated_clients.rs` show each, with a `TpsBudget` for the retries.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//!
//! # fn run() -> Result<(), tonic_pool::Error> {
//! let pool = tonic_pool::Pool::builder("dns:///api.internal:50051").build()?;
//! let layered = ServiceBuilder::new()
//!     .concurrency_limit(256)
//!     .timeout(Duration::from_secs(5))
//!     .service(pool);
//! let grpc = tonic::client::Grpc::new(layered); // or GreeterClient::new(layered)
//! # drop(grpc);
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
//! - Addresses come from resolving the target (DNS, address lists, or a resolver of your own
//!   that owns its scheme: [`PoolBuilder::resolver_for_scheme`]), or are pushed by a caller
//!   with its own discovery stream ([`resolve::Push`], [`PoolBuilder::discovery`]); a
//!   `unix:path` or `unix-abstract:name` target is one Unix domain socket, never resolved.
//!   Endpoints are keyed by [`EndpointAddr`] (a TCP address or a Unix socket).
//! - Subsetting ([`PoolBuilder::subset_size`]): in a large fleet each client connects to
//!   `k` of the addresses, chosen by rendezvous hashing (gRFC A68) or, for clients that know
//!   their index, deterministically (Google's SRE book).
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
//! ## Health checking (feature `health`)
//!
//! With `PoolBuilder::health_check` each connection watches its server's health with
//! `grpc.health.v1.Health/Watch` (gRFC A17, tonic-health's generated client), as a stream on
//! the connection itself, and takes calls only while the server says `SERVING`. What the Watch
//! says shows as the connection's state, so snapshots, events and the pool's state tell it:
//!
//! | the Watch says | connection state (reason) | takes new calls |
//! |---|---|---|
//! | nothing yet (just connected) | Connecting | no |
//! | `SERVING` | Ready | yes |
//! | `NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN` | TransientFailure ("health check: server not serving: …") | no |
//! | the call fails with `UNIMPLEMENTED` (no health service) | Ready, logged; not asked again | yes |
//! | the call fails otherwise, or ends | TransientFailure, then Connecting while it is retried with the pool's backoff (at once if it had answered) | no |
//!
//! A connection that does not take calls stays open: its calls in flight finish, and
//! `SERVING` makes it Ready again at once. A server that turns `NOT_SERVING` gets no new call
//! from the moment its answer reaches the pool, about one round trip after its change. When
//! no server is serving the pool is in TransientFailure: calls fail fast with `UNAVAILABLE`
//! (the message names the status) or wait with [`WaitForReady`]. The Watch takes one of the
//! server's `MAX_CONCURRENT_STREAMS` without counting as a call in flight, and a connection
//! that is not Ready shows no calls in flight in snapshots.
//!
//! ## Outlier detection
//!
//! [`PoolBuilder::outlier_detection`] turns on gRFC A50: every interval, an address whose
//! calls failed much more than its peers' (success rate more than `stdev_factor` standard
//! deviations below the mean, or failure percentage above a threshold) is ejected: it takes
//! no new call, its connections stay open and its calls in flight finish. It comes back after
//! `base_ejection_time` times the number of its ejections (capped), and
//! `max_ejection_percent` bounds how many are out at once. `OK` counts as a success;
//! `UNAVAILABLE` and every other status except `CANCELLED` and `DEADLINE_EXCEEDED` count as
//! failures (a caller giving up says nothing about the server; transparently retried
//! attempts count neither way). Should every address with a Ready connection be ejected
//! anyway, calls go to the ejected ones rather than fail. Snapshots show
//! [`EndpointSnapshot::ejected`] and [`EndpointSnapshot::ejection_count`]; each ejection and
//! return is logged at INFO with the address's success rate.
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
#[cfg(feature = "metrics")]
pub mod metrics;
mod registry;
mod worker;
// One connection.
mod conn;
// Leaves: every layer may use them.
mod addr;
mod backoff;
mod config;
pub mod connector;
mod error;
mod outlier;
pub mod resolve;
pub mod state;
pub mod stream;
mod subset;
pub mod target;
// The tuner behind the `tonic-pool-tune` binary: a tool, not the pool's API.
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tune")]
pub mod tune;

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
    #[cfg(feature = "metrics")]
    pub use crate::metrics::CallSamples;
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

pub use addr::EndpointAddr;
pub use backoff::BackoffConfig;
pub use balance::Balance;
/// A boxed, sendable future, as resolvers ([`resolve::Resolve`]) and connectors
/// ([`connector::Connect`]) return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub use builder::PoolBuilder;
pub use call::{ResponseBody, WaitForReady};
pub use error::Error;
pub use outlier::{FailurePercentageEjection, OutlierDetection, SuccessRateEjection};
pub use pool::{Pool, ResponseFuture};
pub use state::{
    CallCounts, ConnectionSnapshot, ConnectivityState, Counters, Disconnections, EndpointSnapshot,
    PoolSnapshot, PoolSummary, Scope, StateCounts, StateEvent, StateEvents, StateWatch,
};
pub use stream::{ResilientStream, StreamEvent};
pub use target::{Target, TargetError};
#[cfg(feature = "tls")]
pub use tls::TlsConfig;
