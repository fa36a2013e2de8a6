//! Connectivity states, their aggregation, and the handles to watch them.
//!
//! The states and their meaning are gRPC's (`connectivity-semantics-and-api.md`):
//!
//! ```text
//!            connect()/first call         SETTINGS received
//!   Idle ───────────────────────▶ Connecting ─────────────────▶ Ready
//!    ▲                                │  ▲                        │
//!    │ GOAWAY (graceful)              │  │ backoff elapsed        │ connection lost,
//!    │                                ▼  │                        │ keepalive timeout
//!    └────────────────────────── TransientFailure ◀───────────────┘
//!
//!   any state ── close() / last handle dropped ──▶ Shutdown (terminal)
//! ```
//!
//! An endpoint (one address) and the pool aggregate the states below them with gRPC's rule:
//! any Ready → Ready; else any Connecting → Connecting; else any Idle → Idle; else
//! TransientFailure. A pool without endpoints is Idle until it is asked to connect, Connecting
//! while it resolves, and TransientFailure once resolution failed with no good answer ever (an
//! empty or failed answer after a good one keeps the last good addresses). A connection that
//! failed
//! counts as TransientFailure until it is Ready again, so that its reconnect attempts do not make
//! the aggregate flap back to Connecting (and calls keep failing fast while a server is down).

use crate::addr::EndpointAddr;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc, watch};

/// The connectivity state of a connection, an endpoint or a whole pool, as gRPC defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectivityState {
    /// Not connected and not trying to; a call or [`Pool::connect`](crate::Pool::connect)
    /// starts connecting.
    Idle,
    /// A connection attempt is under way.
    Connecting,
    /// Connected: the server's HTTP/2 SETTINGS arrived, calls can be sent.
    Ready,
    /// The connection failed or was lost; it is retried after a backoff.
    TransientFailure,
    /// Closed for good.
    Shutdown,
}

impl ConnectivityState {
    /// The gRPC name of the state, e.g. `TRANSIENT_FAILURE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "IDLE",
            Self::Connecting => "CONNECTING",
            Self::Ready => "READY",
            Self::TransientFailure => "TRANSIENT_FAILURE",
            Self::Shutdown => "SHUTDOWN",
        }
    }
}

impl fmt::Display for ConnectivityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Aggregates states with gRPC's rule. An empty set is `TransientFailure`. (The pool counts
/// states instead, [`StateCounts::aggregate`]; this is the rule those counts must follow.)
#[cfg(test)]
///
/// `Shutdown` members are ignored (a closing connection says nothing about the others); a set
/// made only of `Shutdown` members is `Shutdown`.
pub(crate) fn aggregate<I>(states: I) -> ConnectivityState
where
    I: IntoIterator<Item = ConnectivityState>,
{
    let (mut connecting, mut idle, mut failure, mut shutdown) = (false, false, false, false);
    for state in states {
        match state {
            ConnectivityState::Ready => return ConnectivityState::Ready,
            ConnectivityState::Connecting => connecting = true,
            ConnectivityState::Idle => idle = true,
            ConnectivityState::TransientFailure => failure = true,
            ConnectivityState::Shutdown => shutdown = true,
        }
    }
    if connecting {
        ConnectivityState::Connecting
    } else if idle {
        ConnectivityState::Idle
    } else if failure || !shutdown {
        ConnectivityState::TransientFailure
    } else {
        ConnectivityState::Shutdown
    }
}

/// How many connections or endpoints are in each state: what the pool keeps up to date on
/// every change, so that its aggregates and [`PoolSummary`] cost O(1) however large it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StateCounts {
    /// In `IDLE`.
    pub idle: usize,
    /// In `CONNECTING`.
    pub connecting: usize,
    /// In `READY`.
    pub ready: usize,
    /// In `TRANSIENT_FAILURE`.
    pub transient_failure: usize,
    /// In `SHUTDOWN`.
    pub shutdown: usize,
}

impl StateCounts {
    /// How many are in `state`.
    pub fn get(&self, state: ConnectivityState) -> usize {
        match state {
            ConnectivityState::Idle => self.idle,
            ConnectivityState::Connecting => self.connecting,
            ConnectivityState::Ready => self.ready,
            ConnectivityState::TransientFailure => self.transient_failure,
            ConnectivityState::Shutdown => self.shutdown,
        }
    }

    /// How many there are, whatever their state.
    pub fn total(&self) -> usize {
        self.idle + self.connecting + self.ready + self.transient_failure + self.shutdown
    }

    fn slot(&mut self, state: ConnectivityState) -> &mut usize {
        match state {
            ConnectivityState::Idle => &mut self.idle,
            ConnectivityState::Connecting => &mut self.connecting,
            ConnectivityState::Ready => &mut self.ready,
            ConnectivityState::TransientFailure => &mut self.transient_failure,
            ConnectivityState::Shutdown => &mut self.shutdown,
        }
    }

    /// Counts one more in `state`.
    pub(crate) fn add(&mut self, state: ConnectivityState) {
        *self.slot(state) += 1;
    }

    /// Counts one fewer in `state` (which must have been counted).
    pub(crate) fn remove(&mut self, state: ConnectivityState) {
        let slot = self.slot(state);
        debug_assert!(*slot > 0, "{state} was not counted");
        *slot = slot.saturating_sub(1);
    }

    /// One member moves from `from` to `to`.
    pub(crate) fn moved(&mut self, from: ConnectivityState, to: ConnectivityState) {
        if from != to {
            self.remove(from);
            self.add(to);
        }
    }

    /// The aggregate of the members counted, by gRPC's rule (see the module docs), in O(1):
    /// Shutdown members are ignored unless all are; an empty set is TransientFailure.
    pub(crate) fn aggregate(&self) -> ConnectivityState {
        if self.ready > 0 {
            ConnectivityState::Ready
        } else if self.connecting > 0 {
            ConnectivityState::Connecting
        } else if self.idle > 0 {
            ConnectivityState::Idle
        } else if self.transient_failure > 0 || self.shutdown == 0 {
            ConnectivityState::TransientFailure
        } else {
            ConnectivityState::Shutdown
        }
    }
}

/// The pool in a few numbers, from [`Pool::summary`](crate::Pool::summary): what it keeps up
/// to date on every change, so that reading it costs O(1) whatever the pool's size — unlike
/// a [`PoolSnapshot`], which lists every endpoint and connection. Wait on it with
/// [`Pool::wait_until_summary`](crate::Pool::wait_until_summary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolSummary {
    /// The pool's aggregate state.
    pub state: ConnectivityState,
    /// The connections of the endpoints in the address set, by their state (as
    /// [`ConnectionSnapshot::state`] shows it).
    pub connections: StateCounts,
    /// The endpoints in the address set, by their aggregate state.
    pub endpoints: StateCounts,
    /// Endpoints that left the address set and are finishing their calls.
    pub draining_endpoints: usize,
    /// Their connections.
    pub draining_connections: usize,
    /// Endpoints in the address set that outlier detection ejected (gRFC A50): Ready, but
    /// given no calls until their ejection ends (see [`EndpointSnapshot::ejected`]).
    pub ejected_endpoints: usize,
    /// Calls in flight over the whole pool.
    pub in_flight: usize,
}

/// Waits until the watched value satisfies `condition` and returns a copy of it, or `None`
/// when the sender is gone. Unlike `watch::Receiver::wait_for` it holds no borrow across the
/// caller's next await.
pub(crate) async fn wait_until<T: Clone>(
    rx: &mut watch::Receiver<T>,
    condition: impl FnMut(&T) -> bool,
) -> Option<T> {
    rx.wait_for(condition).await.ok().map(|v| v.clone())
}

/// What a state change happened to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scope {
    /// The pool as a whole.
    Pool,
    /// The endpoint (resolved address).
    Endpoint(EndpointAddr),
    /// One connection of an endpoint, by its pool-unique id.
    Connection {
        /// The address the connection goes to.
        addr: EndpointAddr,
        /// The connection's id, unique within the pool.
        id: u64,
    },
}

/// One state transition, as delivered by [`Pool::events`](crate::Pool::events).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StateEvent {
    /// What changed.
    pub scope: Scope,
    /// The state before.
    pub from: ConnectivityState,
    /// The state after.
    pub to: ConnectivityState,
    /// Why, in words (e.g. `connect error: connection refused`).
    pub reason: String,
}

/// How many connection transitions a slow [`StateEvents`] receiver may fall behind before it
/// misses some.
const CONNECTION_EVENT_CAPACITY: usize = 4096;

/// An event with its place in the pool's sequence of events.
type Numbered = (u64, StateEvent);

/// Where the registry sends every transition, under its lock (which orders them): connection
/// transitions to one bounded broadcast, pool and endpoint transitions to each receiver's own
/// queue, which loses none. Numbered, so that a receiver puts them back in order.
#[derive(Debug)]
pub(crate) struct EventSender {
    next: u64,
    connections: broadcast::Sender<Numbered>,
    scoped: Vec<mpsc::UnboundedSender<Numbered>>,
}

impl EventSender {
    pub(crate) fn new() -> Self {
        Self {
            next: 0,
            connections: broadcast::channel(CONNECTION_EVENT_CAPACITY).0,
            scoped: Vec::new(),
        }
    }

    /// A receiver of every transition from now on.
    pub(crate) fn subscribe(&mut self) -> StateEvents {
        let (scoped_tx, scoped) = mpsc::unbounded_channel();
        self.scoped.push(scoped_tx);
        StateEvents {
            connections: Some(self.connections.subscribe()),
            scoped: Some(scoped),
            next_connection: None,
            next_scoped: None,
        }
    }

    pub(crate) fn send(&mut self, event: StateEvent) {
        let numbered = (self.next, event);
        self.next += 1;
        if matches!(numbered.1.scope, Scope::Connection { .. }) {
            let _ = self.connections.send(numbered);
        } else {
            // Receivers that were dropped are forgotten on the way.
            self.scoped.retain(|tx| tx.send(numbered.clone()).is_ok());
        }
    }
}

/// Every state transition of a pool, its endpoints and its connections, in order, from
/// [`Pool::events`](crate::Pool::events).
///
/// The pool's and its endpoints' transitions are never lost: each receiver has its own queue
/// of them (a few per endpoint each time the address set or a server's health changes; a
/// receiver kept must be read, or dropped). Connection transitions — two or three per
/// connection at start-up and at close, tens of thousands in a large pool — share one buffer
/// of 4096: a receiver that falls further behind misses the oldest of them and learns how
/// many from [`RecvError::Lagged`], then goes on with the rest, in order.
#[derive(Debug)]
pub struct StateEvents {
    /// `None` once closed.
    connections: Option<broadcast::Receiver<Numbered>>,
    scoped: Option<mpsc::UnboundedReceiver<Numbered>>,
    /// The next event of each kind, already taken from its channel.
    next_connection: Option<Numbered>,
    next_scoped: Option<Numbered>,
}

impl StateEvents {
    /// The next transition; waits for one.
    ///
    /// Fails with [`RecvError::Lagged`]`(n)` when `n` connection transitions were missed
    /// (the next call goes on after them), and with [`RecvError::Closed`] once the pool is
    /// gone and every transition was received.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future loses no event.
    pub async fn recv(&mut self) -> Result<StateEvent, RecvError> {
        loop {
            if let Some(event) = self.take_ready()? {
                return Ok(event);
            }
            if self.connections.is_none() && self.scoped.is_none() {
                return Err(RecvError::Closed);
            }
            let connections = async {
                match &mut self.connections {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let scoped = async {
                match &mut self.scoped {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                got = connections => match got {
                    Ok(event) => self.next_connection = Some(event),
                    Err(RecvError::Closed) => self.connections = None,
                    Err(lagged) => return Err(lagged),
                },
                got = scoped => match got {
                    Some(event) => self.next_scoped = Some(event),
                    None => self.scoped = None,
                },
            }
        }
    }

    /// The next transition if one has arrived, without waiting.
    ///
    /// Fails with [`TryRecvError::Empty`] when none has, and otherwise as
    /// [`recv`](Self::recv) does.
    pub fn try_recv(&mut self) -> Result<StateEvent, TryRecvError> {
        match self.take_ready() {
            Ok(Some(event)) => Ok(event),
            Err(RecvError::Lagged(n)) => Err(TryRecvError::Lagged(n)),
            Err(RecvError::Closed) => Err(TryRecvError::Closed),
            Ok(None) if self.connections.is_none() && self.scoped.is_none() => {
                Err(TryRecvError::Closed)
            }
            Ok(None) => Err(TryRecvError::Empty),
        }
    }

    /// Takes what has arrived of both kinds, and hands out the earlier of the two. Both are
    /// sent under one lock in the order of their numbers, so once an event has arrived, every
    /// earlier one of the other kind has too: the earlier of the two is the next.
    fn take_ready(&mut self) -> Result<Option<StateEvent>, RecvError> {
        if self.next_connection.is_none() {
            if let Some(rx) = &mut self.connections {
                match rx.try_recv() {
                    Ok(event) => self.next_connection = Some(event),
                    Err(TryRecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
                    Err(TryRecvError::Closed) => self.connections = None,
                    Err(TryRecvError::Empty) => {}
                }
            }
        }
        if self.next_scoped.is_none() {
            if let Some(rx) = &mut self.scoped {
                match rx.try_recv() {
                    Ok(event) => self.next_scoped = Some(event),
                    Err(mpsc::error::TryRecvError::Disconnected) => self.scoped = None,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
            }
        }
        let connection_first = match (&self.next_connection, &self.next_scoped) {
            (Some((a, _)), Some((b, _))) => a < b,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return Ok(None),
        };
        let next = if connection_first {
            self.next_connection.take()
        } else {
            self.next_scoped.take()
        };
        Ok(next.map(|(_, event)| event))
    }
}

/// A handle to watch the pool's aggregate state.
///
/// It is a thin wrapper over a [`tokio::sync::watch::Receiver`]: it always sees the latest state
/// and may skip intermediate ones that passed quickly. For every transition, in order, use
/// [`Pool::events`](crate::Pool::events).
#[derive(Clone, Debug)]
pub struct StateWatch {
    rx: watch::Receiver<ConnectivityState>,
}

impl StateWatch {
    pub(crate) fn new(rx: watch::Receiver<ConnectivityState>) -> Self {
        Self { rx }
    }

    /// The current state.
    pub fn current(&self) -> ConnectivityState {
        *self.rx.borrow()
    }

    /// Waits until the state differs from the last one this handle saw, and returns it.
    ///
    /// Returns `Shutdown` once the pool is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future loses nothing; the next call sees the change.
    pub async fn changed(&mut self) -> ConnectivityState {
        match self.rx.changed().await {
            Ok(()) => *self.rx.borrow_and_update(),
            Err(_) => ConnectivityState::Shutdown,
        }
    }

    /// Waits until the state is `state`, for at most `timeout`. Returns whether it got there.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait_for(&mut self, state: ConnectivityState, timeout: Duration) -> bool {
        let wait = wait_until(&mut self.rx, |s| *s == state);
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Some(_)))
    }
}

/// How calls ended, counted per attempt on a connection, by class of gRPC status.
///
/// Every attempt that starts ends in exactly one class, so `started` equals the sum of the
/// classes plus the attempts still in flight. A call that a connection could not take and
/// that went again on another one (a transparent retry) counts as `retried` on the first and
/// as a new attempt on the second.
///
/// | class | gRPC codes | what it usually means |
/// |---|---|---|
/// | `succeeded` | `OK` | |
/// | `cancelled` | `CANCELLED`, `DEADLINE_EXCEEDED` | the caller gave up (dropped the call) or its deadline passed |
/// | `unavailable` | `UNAVAILABLE` | the connection or the server went away; safe to retry |
/// | `errors` | every other code | the server's or the application's answer (`INTERNAL`, `NOT_FOUND`, …) |
/// | `retried` | — | sent again on another connection, the caller never saw it |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallCounts {
    /// Attempts started (picked a connection).
    pub started: u64,
    /// Ended with `OK`.
    pub succeeded: u64,
    /// Ended with `CANCELLED` or `DEADLINE_EXCEEDED`, or dropped by the caller before the end.
    pub cancelled: u64,
    /// Ended with `UNAVAILABLE`.
    pub unavailable: u64,
    /// Ended with any other status.
    pub errors: u64,
    /// Transparently retried on another connection.
    pub retried: u64,
}

impl CallCounts {
    /// Attempts that ended with a status other than `OK` (retries excluded).
    pub fn failed(&self) -> u64 {
        self.cancelled + self.unavailable + self.errors
    }

    fn add(&mut self, other: &Self) {
        self.started += other.started;
        self.succeeded += other.succeeded;
        self.cancelled += other.cancelled;
        self.unavailable += other.unavailable;
        self.errors += other.errors;
        self.retried += other.retried;
    }
}

/// How many times connections stopped serving, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Disconnections {
    /// The server sent GOAWAY (any error code; see [`Counters::goaways`]).
    pub goaway: u64,
    /// The connection was reset or closed without a GOAWAY (I/O error, EOF).
    pub reset: u64,
    /// A keepalive PING was not acknowledged in time.
    pub keepalive_timeout: u64,
    /// Its address left the address set: the connection drained.
    pub drained: u64,
    /// The pool retired it: a grown connection idle for its timeout, or one that could not
    /// open streams any more (its stream ids used up).
    pub retired: u64,
    /// The pool closed.
    pub shutdown: u64,
}

impl Disconnections {
    /// Every disconnection, whatever its reason.
    pub fn total(&self) -> u64 {
        self.goaway
            + self.reset
            + self.keepalive_timeout
            + self.drained
            + self.retired
            + self.shutdown
    }

    fn add(&mut self, other: &Self) {
        self.goaway += other.goaway;
        self.reset += other.reset;
        self.keepalive_timeout += other.keepalive_timeout;
        self.drained += other.drained;
        self.retired += other.retired;
        self.shutdown += other.shutdown;
    }
}

/// Why a connection stopped serving, as the slot counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Disconnect {
    /// GOAWAY with this HTTP/2 error code.
    GoAway(u32),
    Reset,
    KeepAliveTimeout,
    Drained,
    Retired,
    Shutdown,
}

/// How an attempt ended, as its guard tells the counters. Two bytes: every call's in-flight
/// guard carries one (see `InFlightGuard`'s note on its size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// With this gRPC status.
    Status(tonic::Code),
    /// Sent again on another connection (for this reason): the caller never saw this attempt.
    Retried(Retry),
}

/// Why a call may be sent again: it provably never reached the server's application (the
/// call module's `retry.rs` decides when).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// h2 would not open the stream (its connection had failed or was closing).
    Unsent,
    /// The stream was above the last stream id of the server's GOAWAY.
    GoAway,
    /// The server refused the stream (`REFUSED_STREAM`), e.g. past `MAX_CONCURRENT_STREAMS`.
    Refused,
    /// The connection ended after a GOAWAY leaving only streams the server never processed
    /// (see `ConnFate` in `frames.rs`).
    NotOpened,
}

impl Retry {
    /// Its name in traces and in the `reason` label of `tonic_pool.transparent_retries`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Unsent => "unsent",
            Self::GoAway => "goaway",
            Self::Refused => "refused",
            Self::NotOpened => "not_opened",
        }
    }
}

impl Outcome {
    /// The class it is counted in (see [`CallCounts`]).
    #[inline]
    pub(crate) fn class(self) -> usize {
        match self {
            Self::Status(tonic::Code::Ok) => 0,
            Self::Status(tonic::Code::Cancelled | tonic::Code::DeadlineExceeded) => 1,
            Self::Status(tonic::Code::Unavailable) => 2,
            Self::Status(_) => 3,
            Self::Retried(_) => 4,
        }
    }
}

/// Counters of a connection slot (across its reconnects), an endpoint (its slots, including
/// those it no longer has) or the pool (every endpoint it ever had).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Calls (attempts), by how they ended.
    pub calls: CallCounts,
    /// Connection attempts (TCP + HTTP/2 handshake, until the server's SETTINGS).
    pub connect_attempts: u64,
    /// Connection attempts that failed or timed out.
    pub connect_failures: u64,
    /// Connections that stopped serving, by reason.
    pub disconnections: Disconnections,
    /// Connections that received a GOAWAY while serving, by the HTTP/2 error code of the
    /// first one (0 is `NO_ERROR`, 0xb `ENHANCE_YOUR_CALM`).
    pub goaways: BTreeMap<u32, u64>,
    /// When the last call started, if any did.
    pub last_call: Option<Instant>,
}

impl Counters {
    /// Adds `other` in (the latest `last_call` wins).
    pub(crate) fn add(&mut self, other: &Self) {
        self.calls.add(&other.calls);
        self.connect_attempts += other.connect_attempts;
        self.connect_failures += other.connect_failures;
        self.disconnections.add(&other.disconnections);
        for (code, n) in &other.goaways {
            *self.goaways.entry(*code).or_default() += n;
        }
        self.last_call = self.last_call.max(other.last_call);
    }
}

/// A point-in-time view of one connection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectionSnapshot {
    /// Pool-unique id of the connection.
    pub id: u64,
    /// Its state.
    pub state: ConnectivityState,
    /// Calls on its current connection (picked, sent, or reading their response) that have
    /// not finished; 0 while it is not Ready. Calls still finishing on a connection it
    /// replaced (after a GOAWAY) are not counted here.
    pub in_flight: usize,
    /// Calls sent on it since the pool started (across reconnects of this slot).
    pub calls: u64,
    /// How many times this slot connected successfully.
    pub connects: u64,
    /// The server's `MAX_CONCURRENT_STREAMS` on the current connection, when Ready and set.
    pub max_concurrent_streams: Option<u32>,
    /// The last error seen on it, if any.
    pub last_error: Option<String>,
    /// When it entered its current state.
    pub state_since: Instant,
    /// Its counters, across its reconnects.
    pub counters: Counters,
}

/// A point-in-time view of one endpoint (resolved address).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EndpointSnapshot {
    /// The address.
    pub addr: EndpointAddr,
    /// Its aggregate state.
    pub state: ConnectivityState,
    /// Whether it left the address set and is only finishing its calls.
    pub draining: bool,
    /// The HTTP/2 keepalive interval its new connections use (doubled after each GOAWAY
    /// `too_many_pings`), or `None` when keepalive is off.
    pub keepalive_interval: Option<std::time::Duration>,
    /// Its connections.
    pub connections: Vec<ConnectionSnapshot>,
    /// When it entered its current state.
    pub state_since: Instant,
    /// Its counters: its connections', including connections it no longer has.
    pub counters: Counters,
    /// Whether outlier detection ejected it: it takes no new call until it comes back (see
    /// [`PoolBuilder::outlier_detection`](crate::PoolBuilder::outlier_detection)).
    pub ejected: bool,
    /// How many times outlier detection ejected it.
    pub ejection_count: u64,
}

/// A point-in-time view of the whole pool, from [`Pool::snapshot`](crate::Pool::snapshot).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PoolSnapshot {
    /// The pool's aggregate state.
    pub state: ConnectivityState,
    /// Every endpoint, draining ones included.
    pub endpoints: Vec<EndpointSnapshot>,
    /// The last connection failure, with its address.
    pub last_error: Option<String>,
    /// The last failed resolution, if any (the pool kept its last good addresses).
    pub last_resolve_error: Option<String>,
    /// How many resolutions failed so far.
    pub resolve_errors: u64,
    /// When the pool entered its current state.
    pub state_since: Instant,
    /// Every endpoint's counters, including endpoints the pool no longer has.
    pub counters: Counters,
    /// Calls that failed with no connection to count them: no Ready connection (fail-fast in
    /// TRANSIENT_FAILURE), a deadline that passed while waiting for one, the pool closed —
    /// also after a transparent retry (the attempt before counts as `retried`).
    pub calls_without_connection: u64,
}

impl PoolSnapshot {
    /// How many connections (of endpoints that are not draining) are Ready.
    pub fn ready_connections(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|e| !e.draining)
            .flat_map(|e| &e.connections)
            .filter(|c| c.state == ConnectivityState::Ready)
            .count()
    }

    /// Calls in flight over every connection.
    pub fn in_flight(&self) -> usize {
        self.endpoints
            .iter()
            .flat_map(|e| &e.connections)
            .map(|c| c.in_flight)
            .sum()
    }

    /// The snapshot of the endpoint at `addr`, if there is one: the active one (in the address
    /// set, taking new calls) when an address was removed and listed again while its old
    /// endpoint still drains; otherwise the draining one.
    pub fn endpoint(&self, addr: impl Into<EndpointAddr>) -> Option<&EndpointSnapshot> {
        let addr = addr.into();
        let mut at = self.endpoints.iter().filter(|e| e.addr == addr);
        let first = at.next()?;
        Some(
            std::iter::once(first)
                .chain(at)
                .find(|e| !e.draining)
                .unwrap_or(first),
        )
    }
}

/// A compact table, the way `grpcdebug channelz` shows a channel: a line for the pool, then
/// one row per endpoint (connection `*`) followed by a row per connection.
///
/// ```text
/// pool READY  in flight 3  calls 1200  failed 4  without connection 0  resolve errors 0
/// ENDPOINT         CONN  STATE              IN FLIGHT  CALLS  FAILED  LAST ERROR
/// 127.0.0.2:50051  *     READY                      3    800       4
///                  0     READY                      2    400       2  GOAWAY from server
///                  1     READY                      1    400       2
/// 127.0.0.3:50051  *     TRANSIENT_FAILURE          0    400       0
///                  2     TRANSIENT_FAILURE          0    400       0  connect error: …
/// ```
///
/// `CALLS` counts attempts started, `FAILED` those that ended with a status other than `OK`
/// (see [`CallCounts`]). An endpoint leaving the address set shows `(draining)`, one that
/// outlier detection ejected `(ejected)`.
impl fmt::Display for PoolSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pool {}  in flight {}  calls {}  failed {}  without connection {}  resolve errors {}",
            self.state,
            self.in_flight(),
            self.counters.calls.started,
            self.counters.calls.failed(),
            self.calls_without_connection,
            self.resolve_errors,
        )?;
        const HEAD: [&str; 7] = [
            "ENDPOINT",
            "CONN",
            "STATE",
            "IN FLIGHT",
            "CALLS",
            "FAILED",
            "LAST ERROR",
        ];
        let one_line = |e: &Option<String>| e.as_deref().unwrap_or("").replace('\n', " ");
        let mut rows: Vec<[String; 7]> = Vec::new();
        for endpoint in &self.endpoints {
            let mut state = endpoint.state.to_string();
            if endpoint.draining {
                state.push_str(" (draining)");
            }
            if endpoint.ejected {
                state.push_str(" (ejected)");
            }
            rows.push([
                endpoint.addr.to_string(),
                "*".to_owned(),
                state,
                endpoint
                    .connections
                    .iter()
                    .map(|c| c.in_flight)
                    .sum::<usize>()
                    .to_string(),
                endpoint.counters.calls.started.to_string(),
                endpoint.counters.calls.failed().to_string(),
                String::new(),
            ]);
            for conn in &endpoint.connections {
                rows.push([
                    String::new(),
                    conn.id.to_string(),
                    conn.state.to_string(),
                    conn.in_flight.to_string(),
                    conn.counters.calls.started.to_string(),
                    conn.counters.calls.failed().to_string(),
                    one_line(&conn.last_error),
                ]);
            }
        }
        let mut widths = HEAD.map(str::len);
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: [&str; 7]| -> fmt::Result {
            let [endpoint, conn, state, in_flight, calls, failed, error] = cells;
            let [w0, w1, w2, w3, w4, w5, _] = widths;
            let text = format!(
                "{endpoint:<w0$}  {conn:<w1$}  {state:<w2$}  {in_flight:>w3$}  {calls:>w4$}  {failed:>w5$}  {error}"
            );
            writeln!(f, "{}", text.trim_end())
        };
        line(f, HEAD)?;
        for row in &rows {
            line(f, row.each_ref().map(String::as_str))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ConnectivityState::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aggregation_follows_grpc() {
        assert_eq!(aggregate([]), TransientFailure);
        assert_eq!(aggregate([TransientFailure, Ready, Idle]), Ready);
        assert_eq!(aggregate([TransientFailure, Connecting, Idle]), Connecting);
        assert_eq!(aggregate([TransientFailure, Idle]), Idle);
        assert_eq!(
            aggregate([TransientFailure, TransientFailure]),
            TransientFailure
        );
        assert_eq!(aggregate([Shutdown, Shutdown]), Shutdown);
        assert_eq!(aggregate([Shutdown, TransientFailure]), TransientFailure);
        assert_eq!(aggregate([Shutdown, Connecting]), Connecting);
    }

    fn any_state() -> impl Strategy<Value = ConnectivityState> {
        prop_oneof![
            Just(Idle),
            Just(Connecting),
            Just(Ready),
            Just(TransientFailure),
            Just(Shutdown)
        ]
    }

    proptest! {
        /// The aggregate is order-independent, and Ready wins whenever present.
        #[test]
        fn aggregation_is_a_priority(mut states in proptest::collection::vec(any_state(), 0..20)) {
            let a = aggregate(states.iter().copied());
            states.reverse();
            prop_assert_eq!(a, aggregate(states.iter().copied()));
            let expected = if states.contains(&Ready) { Ready }
                else if states.contains(&Connecting) { Connecting }
                else if states.contains(&Idle) { Idle }
                else if !states.is_empty() && states.iter().all(|s| *s == Shutdown) { Shutdown }
                else { TransientFailure };
            prop_assert_eq!(a, expected);
            let mut counts = StateCounts::default();
            for state in &states {
                counts.add(*state);
            }
            prop_assert_eq!(counts.aggregate(), expected);
        }
    }
}
