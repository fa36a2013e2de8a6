//! Balancing: which Ready connection a call goes to.
//!
//! The registry publishes an immutable [`Picker`] over the Ready connections, grouped by
//! address in the endpoint set's order, whenever that set changes; a pick reads it without a
//! lock. Every policy implements one interface, [`Policy`](picker::Policy): given that snapshot (and the
//! pool's one shared cursor), name an entry. The snapshot and the policy live together in the
//! picker, so the generation cache of [`Pool`](crate::Pool) handles works the same for all.
//!
//! # Per address, then per connection
//!
//! Every policy picks an *address* first and then one of that address's connections, so an
//! address's share does not depend on how many connections it has: a
//! [`connections_for`](crate::PoolBuilder::connections_for) override, or growth past a full
//! connection, adds room to that address without dragging more calls to it.
//!
//! # Which policy when
//!
//! | policy | picks | use it for |
//! |---|---|---|
//! | [`Balance::RoundRobin`] (default) | addresses in turn, then that address's connections in turn; one atomic add | servers of equal speed; an L4 load balancer (one address, N connections spread over its backends) |
//! | [`Balance::LeastRequest`] | of two random addresses, the one with fewer calls in flight; then of two of its connections, the one with fewer | a headless Service whose pods differ in speed or load (noisy neighbours, GC pauses, cold caches) |
//! | [`Balance::PeakEwma`] | as least request, weighing calls in flight by each address's peak-sensitive latency | the same, when a slow pod must get almost nothing (tail latency matters) |
//! | [`Balance::PickFirst`] | the first address, in resolver order, with a Ready connection; its connections in turn | a leader, a local sidecar, sticky backends; the others are warm standbys |
//!
//! Behind an **L4 load balancer** (one address, a `Service` with a cluster IP, a cloud LB)
//! there is one address, so the per-address step does nothing and the policy works over
//! that address's connections, each of which the load balancer pinned to some backend: round
//! robin spreads calls over the N connections (and so over up to N backends), least request
//! and PeakEWMA steer away from the connections whose backend is slow. With a **headless
//! Service** (DNS returns every pod) each pod is an address and gets the same share under
//! round robin whatever its connection count; least request or PeakEWMA send a slow pod less.
//! An address that stands for many backends (a load balancer listed among pods) gets one
//! address's share too: connections add room to it, not weight.

// `pub` (not `pub(crate)`) so that the benches can reach them through `__bench`.
#![allow(unreachable_pub)]

mod least_request;
mod peak_ewma;
mod pick_first;
mod picker;
mod rng;
mod round_robin;

pub use least_request::LeastRequest;
pub(crate) use peak_ewma::{epoch, now_ns};
pub use peak_ewma::{PeakEwma, RttEstimate};
pub use pick_first::PickFirst;
pub use picker::{Pickable, Picker};
pub use round_robin::RoundRobin;

/// How a pool spreads calls over its Ready connections, set with
/// [`PoolBuilder::balance`](crate::PoolBuilder::balance).
///
/// Every policy picks an address first and then one of its connections, so that an address's
/// share does not grow with its connection count: a
/// [`connections_for`](crate::PoolBuilder::connections_for) override or growth adds room to
/// an address, not traffic. Connections that are closing are never picked; among the rest,
/// one with room under the server's `MAX_CONCURRENT_STREAMS` is preferred.
///
/// Behind an L4 load balancer (one address, N connections that it pinned to different
/// backends) the policy works over those N connections: round robin spreads calls over them,
/// the load-aware policies steer away from a connection whose backend is slow. With a
/// headless Service (one address per pod) every pod gets the same share under round robin
/// whatever its connection count, and a slow pod gets less under the load-aware ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Balance {
    /// Round robin over addresses, then over that address's connections (gRPC's
    /// `round_robin`, per address). A pick is one atomic add on a cursor every handle shares.
    /// The default; for servers of equal speed, and for an L4 load balancer's one address.
    #[default]
    RoundRobin,
    /// Power of two choices on calls in flight (gRFC A48's `least_request`, `choice_count` 2):
    /// two different addresses drawn at random, the one with fewer calls in flight wins (the
    /// first drawn on a tie); then the same between two of its connections. O(1), lock-free.
    ///
    /// Unlike A48's pseudo-code the two draws are distinct (as tower's and Finagle's p2c): A48
    /// notes that drawing with replacement lets the same endpoint be chosen twice, so a frozen
    /// one is never fully avoided — with three addresses, a ninth of all calls.
    ///
    /// For pods that differ in speed or load (noisy neighbours, GC pauses, cold caches).
    LeastRequest,
    /// Latency-aware power of two choices, as tower's `p2c` balancer over `PeakEwma` load and
    /// linkerd's: the cost of an address is its latency estimate times (calls in flight + 1),
    /// and the cheaper of two random addresses wins, then of two of its connections.
    ///
    /// Each connection keeps a peak-sensitive moving average of its response times (the time
    /// from the pick to the response headers): a slower response replaces the estimate at
    /// once, faster ones pull it down with a time constant of 10 s; between responses the
    /// estimate decays toward zero, so an idle slow server is tried again. A connection that
    /// has answered nothing yet counts 30 ms (linkerd's defaults).
    ///
    /// For the same as least request when a slow server must get almost nothing: least
    /// request still gives it calls whenever it holds fewer than the other server drawn,
    /// PeakEWMA only once its latency times its calls is the lower.
    PeakEwma,
    /// gRPC's default policy `pick_first`: every call goes to the first address, in resolver
    /// order, that has a Ready connection (its connections in turn); when it has none, the
    /// next one, and back to the first once it is Ready again. When every connection of that
    /// address is full the calls stay there (it grows, if allowed), they do not spill over.
    ///
    /// Resolver order is the order of the latest address set (resolved or pushed): a set
    /// that reorders its addresses moves the calls to its new first address with a Ready
    /// connection. Unlike gRPC's `pick_first`, the pool keeps every address connected, so
    /// failing over does not wait for a connection.
    ///
    /// For a leader, a local sidecar, sticky backends; the others are warm standbys.
    PickFirst,
}

/// The time constant of `Balance::PeakEwma`'s moving average (linkerd's and Finagle's).
pub(crate) const PEAK_EWMA_DECAY: std::time::Duration = std::time::Duration::from_secs(10);

/// The latency `Balance::PeakEwma` assumes of a connection that has not answered yet
/// (linkerd's default).
pub(crate) const PEAK_EWMA_DEFAULT_RTT: std::time::Duration = std::time::Duration::from_millis(30);
