//! One connection slot: its state machine, its backoff and its HTTP/2 connection.
//!
//! Each slot runs as its own task, owned by the worker. It drives h2's client connection
//! directly rather than a tonic `Channel`: a `Channel` hides its connection behind a `Buffer`
//! and a `Reconnect` with no backoff that reports a failed connection as ready, which would
//! fight this state machine. Owning the connection gives the pool exact facts: when the
//! server's SETTINGS arrived, when a GOAWAY came, when the connection is gone. Calls are sent
//! from the caller's task (`exchange.rs`); the connection's I/O runs on its driver task
//! (`driver.rs`).
//!
//! ```text
//! loop:
//!   Connecting ── TCP + handshake + server SETTINGS (bounded by the connect timeout)
//!     ├─ ok  → Ready (published to the picker); backoff reset
//!     │        wait: connection ends │ GOAWAY │ drain │ shutdown
//!     │        GOAWAY(NO_ERROR) → Idle, reconnect at once
//!     │        lost             → TransientFailure, reconnect at once (first attempt is free)
//!     └─ err → TransientFailure; sleep backoff; retry
//! ```
//!
//! When a connection leaves the picker, calls already on it keep running: the slot *retires* its
//! driver, which lives on until the connection's last call ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::connector::{Connect, Destination};
use crate::driver::{DriverEnd, H2Connection, KeepAlivePlan, ReadActivity};
use crate::error::BoxError;
use crate::frames::{ConnFate, FrameWatch, GoAway, PeerLimits, Watched};
use crate::picker::Pickable;
use crate::registry::{InFlight, Room, Shared};
use crate::state::{wait_until, ConnectivityState};
use crate::target::TargetKind;

/// Counters of one connection slot, kept across its reconnects.
#[derive(Debug)]
pub(crate) struct ConnStats {
    calls: AtomicU64,
    connects: AtomicU64,
    /// The pool's count, which `close()` waits on.
    pool: Arc<InFlight>,
    /// The pool's signal to calls waiting for room.
    room: Arc<Room>,
}

impl ConnStats {
    pub(crate) fn new(pool: Arc<InFlight>, room: Arc<Room>) -> Self {
        Self {
            calls: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            pool,
            room,
        }
    }

    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub(crate) fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
}

/// Held by a call from the moment it picks a connection until its response body ends or is
/// dropped (a transparent retry drops it and takes a new one).
#[derive(Debug)]
pub(crate) struct InFlightGuard {
    conn: Arc<ReadyConn>,
    /// How many calls the connection counted with this one, when it was picked.
    place: usize,
    /// Given back to pick again, not ended: wakes no call waiting for room.
    requeued: bool,
}

impl InFlightGuard {
    /// The connection the call is on.
    pub(crate) fn conn(&self) -> &Arc<ReadyConn> {
        &self.conn
    }

    /// Whether the call came after the server's stream limit was already taken on its
    /// connection: HTTP/2 would queue it until one of the calls before it ends.
    pub(crate) fn is_beyond_stream_limit(&self) -> bool {
        self.place as u64 > u64::from(self.conn.limits.max_concurrent_streams())
    }

    /// Gives the connection back without sending: the call will pick again.
    pub(crate) fn requeue(mut self) {
        self.requeued = true;
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.conn.in_flight.dec();
        self.conn.stats.pool.dec();
        if !self.requeued {
            self.conn.stats.room.freed();
        }
    }
}

/// A Ready connection as the picker holds it.
#[derive(Debug)]
pub(crate) struct ReadyConn {
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    pub(crate) send: h2::client::SendRequest<Bytes>,
    pub(crate) stats: Arc<ConnStats>,
    /// Calls on this connection; its capacity, draining and retirement go by it.
    in_flight: InFlight,
    /// Set the moment the connection must take no new call (GOAWAY seen, draining, lost,
    /// retired), before the registry republishes the picker.
    closing: AtomicBool,
    /// How its byte stream ended, for classifying the calls it broke.
    pub(crate) fate: Arc<ConnFate>,
    /// The server's stream limit on this connection.
    pub(crate) limits: Arc<PeerLimits>,
}

impl ReadyConn {
    pub(crate) fn new(
        id: u64,
        addr: SocketAddr,
        send: h2::client::SendRequest<Bytes>,
        stats: Arc<ConnStats>,
        fate: Arc<ConnFate>,
        limits: Arc<PeerLimits>,
    ) -> Self {
        Self {
            id,
            addr,
            send,
            stats,
            in_flight: InFlight::default(),
            closing: AtomicBool::new(false),
            fate,
            limits,
        }
    }

    pub(crate) fn mark_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Waits until no call is in flight on this connection.
    pub(crate) async fn wait_idle(&self) {
        self.in_flight.wait_zero().await;
    }

    /// A call starts on this connection.
    pub(crate) fn start_call(self: &Arc<Self>) -> InFlightGuard {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let place = self.in_flight.inc();
        self.stats.pool.inc();
        InFlightGuard {
            conn: Arc::clone(self),
            place,
            requeued: false,
        }
    }
}

impl Pickable for Arc<ReadyConn> {
    #[inline]
    fn is_available(&self) -> bool {
        !self.closing.load(Ordering::Acquire)
    }

    #[inline]
    fn has_capacity(&self) -> bool {
        (self.in_flight() as u64) < u64::from(self.limits.max_concurrent_streams())
    }
}

/// The HTTP/2 keepalive interval shared by the connections of one endpoint.
///
/// gRFC A8: a server that finds our PINGs too frequent answers with GOAWAY
/// `ENHANCE_YOUR_CALM` / `too_many_pings`; the client must then double its interval (for that
/// endpoint's new connections) instead of being disconnected again and again.
#[derive(Debug)]
pub(crate) struct KeepAlive {
    /// The interval in milliseconds; 0 when keepalive is off.
    millis: AtomicU64,
}

impl KeepAlive {
    pub(crate) fn new(interval: Option<Duration>) -> Self {
        let millis = interval.map_or(0, |d| (d.as_millis() as u64).max(1));
        Self {
            millis: AtomicU64::new(millis),
        }
    }

    pub(crate) fn interval(&self) -> Option<Duration> {
        match self.millis.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Doubles the interval (if keepalive is on); returns the new one.
    fn double(&self) -> Option<Duration> {
        let doubled = self
            .millis
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ms| {
                (ms != 0).then(|| ms.saturating_mul(2))
            });
        doubled
            .ok()
            .map(|ms| Duration::from_millis(ms.saturating_mul(2)))
    }
}

/// What the worker asks of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    Run,
    /// The address left the set: finish calls in flight (bounded), then end.
    Drain,
    /// The pool is closing: end now.
    Shutdown,
}

/// Why a Ready connection stopped serving.
enum ServeEnd {
    /// GOAWAY with NO_ERROR (max connection age, graceful server shutdown).
    GracefulGoAway,
    /// GOAWAY `ENHANCE_YOUR_CALM` / `too_many_pings`.
    TooManyPings,
    /// The connection failed or closed without a graceful GOAWAY.
    Lost(String),
    Drain,
    Shutdown,
    /// A grown connection carried no call for its idle timeout.
    Idle,
}

/// Everything a slot's task is started with.
pub(crate) struct Slot {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    pub(crate) stats: Arc<ConnStats>,
    pub(crate) connector: Arc<dyn Connect>,
    pub(crate) keepalive: Arc<KeepAlive>,
    pub(crate) control: watch::Receiver<Control>,
    pub(crate) seed: u64,
    /// For a connection opened by growth: retire it after this long without a call.
    pub(crate) retire_when_idle: Option<Duration>,
}

impl ServeEnd {
    /// How a connection ended, given the GOAWAY it received (if any) and otherwise `lost`.
    fn after(goaway: Option<GoAway>, lost: impl FnOnce() -> String) -> Self {
        match goaway {
            Some(g) if g.is_graceful() => Self::GracefulGoAway,
            Some(g) if g.is_too_many_pings() => Self::TooManyPings,
            Some(g) => Self::Lost(format!("GOAWAY with error code {:#x}", g.error_code)),
            None => Self::Lost(lost()),
        }
    }
}

/// The slot's task. Ends on `Drain` (after its calls finish) or `Shutdown`.
pub(crate) async fn run(slot: Slot) {
    let Slot {
        shared,
        id,
        addr,
        stats,
        connector,
        keepalive,
        mut control,
        seed,
        retire_when_idle,
    } = slot;
    let mut backoff = Backoff::new(shared.config.backoff.clone(), seed);
    let mut connect_rx = shared.subscribe_connect();
    // Stay Idle until the pool is asked to connect (at once unless it is lazy).
    tokio::select! {
        biased;
        _ = wait_until(&mut control, |c| *c != Control::Run) => return finish(&shared, id, "closed while idle"),
        _ = wait_until(&mut connect_rx, |requested| *requested) => {}
    }
    let host = match shared.target.kind() {
        TargetKind::Dns { host, .. } => host.clone(),
        TargetKind::Static(_) => addr.ip().to_string(),
    };
    let dst = Destination {
        addr,
        host,
        tls: shared.target.is_tls(),
    };
    loop {
        if *control.borrow() != Control::Run {
            return finish(&shared, id, "closed");
        }
        shared.transition(id, ConnectivityState::Connecting, "connecting", None);
        let timeout = shared
            .config
            .connect_timeout
            .unwrap_or_else(|| backoff.connect_timeout());
        let attempt = tokio::time::timeout(
            timeout,
            connect(&shared, &*connector, &dst, keepalive.interval()),
        );
        let result = tokio::select! {
            biased;
            _ = wait_until(&mut control, |c| *c != Control::Run) => return finish(&shared, id, "closed while connecting"),
            r = attempt => r,
        };
        let (
            send,
            connection,
            Watched {
                signals,
                kill,
                fate,
                limits,
            },
            keepalive_plan,
        ) = match result {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => {
                let reason = format!("connect error: {}", error_chain(&*e));
                fail_and_wait(&shared, id, &reason, &mut backoff, &mut control).await;
                continue;
            }
            Err(_) => {
                let reason = format!("connect timeout after {timeout:?}");
                fail_and_wait(&shared, id, &reason, &mut backoff, &mut control).await;
                continue;
            }
        };
        backoff.reset();
        stats.connects.fetch_add(1, Ordering::Relaxed);
        let ready = Arc::new(ReadyConn::new(id, addr, send, stats.clone(), fate, limits));
        let mut driver = crate::driver::spawn(connection, ready.clone(), keepalive_plan);
        shared.transition(
            id,
            ConnectivityState::Ready,
            "server settings received",
            Some(ready.clone()),
        );

        let mut goaway_rx = signals.clone();
        let end = tokio::select! {
            biased;
            c = wait_until(&mut control, |c| *c != Control::Run) => match c {
                Some(Control::Drain) => ServeEnd::Drain,
                _ => ServeEnd::Shutdown,
            },
            end = driver.ended() => {
                // A GOAWAY read just before the end explains it better than h2's result.
                let goaway = signals.borrow().goaway.clone();
                ServeEnd::after(goaway, || match end {
                    DriverEnd::Closed(Ok(())) | DriverEnd::Retired => "connection closed".to_owned(),
                    DriverEnd::Closed(Err(e)) => format!("connection lost: {}", error_chain(&e)),
                    DriverEnd::KeepAliveTimeout(t) => {
                        format!("connection lost: keepalive PING not acknowledged within {t:?}")
                    }
                })
            }
            g = wait_until(&mut goaway_rx, |s| s.goaway.is_some()) => {
                ServeEnd::after(g.and_then(|s| s.goaway), || "connection closed".to_owned())
            }
            _ = idle_for(&ready, retire_when_idle) => ServeEnd::Idle,
        };
        // No new call goes to this connection from here on, even through stale pickers.
        ready.mark_closing();
        match end {
            ServeEnd::GracefulGoAway => {
                shared.transition(id, ConnectivityState::Idle, "GOAWAY from server", None);
                shared.request_reresolve();
                // Calls in flight finish on the old connection; reconnect at once.
                driver.retire();
            }
            ServeEnd::TooManyPings => {
                let interval = keepalive.double();
                tracing::warn!(target = %shared.target, %addr, ?interval, "server sent GOAWAY too_many_pings; keepalive interval doubled for this endpoint");
                shared.transition(
                    id,
                    ConnectivityState::TransientFailure,
                    "GOAWAY ENHANCE_YOUR_CALM too_many_pings",
                    None,
                );
                shared.request_reresolve();
                driver.retire();
            }
            ServeEnd::Lost(reason) => {
                shared.transition(id, ConnectivityState::TransientFailure, &reason, None);
                shared.request_reresolve();
                driver.retire();
            }
            ServeEnd::Drain => {
                // Out of the picker already (the endpoint is draining); let calls finish.
                let drained = tokio::select! {
                    biased;
                    _ = wait_until(&mut control, |c| *c == Control::Shutdown) => false,
                    _ = ready.wait_idle() => true,
                    _ = tokio::time::sleep(shared.config.drain_timeout) => false,
                    _ = driver.ended() => true,
                };
                // Calls still running when the drain was cut short are cut with it.
                if !drained {
                    kill.kill();
                }
                driver.retire();
                return finish(
                    &shared,
                    id,
                    if drained {
                        "drained"
                    } else {
                        "drain cut short"
                    },
                );
            }
            ServeEnd::Idle => {
                // Not needed any more: calls that picked it just now still finish on it.
                driver.retire();
                return finish(&shared, id, "idle: grown connection retired");
            }
            ServeEnd::Shutdown => {
                // close() already gave calls in flight their time (or the last handle was
                // dropped): whatever still runs is cut, so that no connection outlives the pool.
                kill.kill();
                driver.retire();
                return finish(&shared, id, "pool closed");
            }
        }
    }
}

/// Completes once `ready` has carried no call for `idle` (checked once per `idle`, so within
/// twice that); never without an idle timeout.
async fn idle_for(ready: &ReadyConn, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let mut seen = ready.stats.calls();
    loop {
        tokio::time::sleep(idle).await;
        let calls = ready.stats.calls();
        if calls == seen && ready.in_flight() == 0 {
            return;
        }
        seen = calls;
    }
}

fn finish(shared: &Shared, id: u64, reason: &str) {
    shared.transition(id, ConnectivityState::Shutdown, reason, None);
    shared.remove_connection(id);
}

async fn fail_and_wait(
    shared: &Shared,
    id: u64,
    reason: &str,
    backoff: &mut Backoff,
    control: &mut watch::Receiver<Control>,
) {
    shared.transition(id, ConnectivityState::TransientFailure, reason, None);
    shared.request_reresolve();
    let delay = backoff.next_delay();
    tracing::debug!(target = %shared.target, conn = id, ?delay, "backing off");
    tokio::select! {
        biased;
        _ = wait_until(control, |c| *c != Control::Run) => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// What a successful connect hands the slot.
type Connected = (
    h2::client::SendRequest<Bytes>,
    H2Connection,
    Watched,
    Option<KeepAlivePlan>,
);

/// Opens one connection: byte stream, HTTP/2 handshake, then waits for the server's SETTINGS
/// while driving the connection.
async fn connect(
    shared: &Shared,
    connector: &dyn Connect,
    dst: &Destination,
    keepalive: Option<Duration>,
) -> Result<Connected, BoxError> {
    let io = connector.connect(dst).await?;
    let config = &shared.config;
    let activity = keepalive.map(|_| Arc::new(ReadActivity::new()));
    let (io, watched) = FrameWatch::new(io, activity.clone());
    let mut builder = h2::client::Builder::new();
    // hyper's (and so a tonic `Channel`'s) defaults, for the same behaviour on the wire.
    builder
        .initial_max_send_streams(100)
        .initial_window_size(config.initial_stream_window_size.unwrap_or(2 * 1024 * 1024))
        .initial_connection_window_size(
            config
                .initial_connection_window_size
                .unwrap_or(5 * 1024 * 1024),
        )
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(1024 * 1024)
        .enable_push(false);
    let (send, mut connection) = builder.handshake::<_, Bytes>(io).await?;
    let mut settings_rx = watched.signals.clone();
    let settings = tokio::select! {
        res = &mut connection => match res {
            Ok(()) => None,
            Err(e) => return Err(e.into()),
        },
        seen = wait_until(&mut settings_rx, |s| s.settings) => seen,
    };
    let plan = keepalive
        .zip(activity)
        .map(|(interval, activity)| KeepAlivePlan {
            interval,
            timeout: config.keep_alive_timeout,
            while_idle: config.keep_alive_while_idle,
            activity,
        });
    match settings {
        Some(_) => Ok((send, connection, watched, plan)),
        None => Err("connection closed before the server's SETTINGS".into()),
    }
}

/// Renders an error with its sources: `a: b: c`, without repeating a part that a source
/// already spells out (hyper's "connection error" over h2's "connection error: …").
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    for source in crate::error::sources(err) {
        let text = source.to_string();
        let last = parts.last_mut().expect("never empty");
        if text.starts_with(last.as_str()) {
            *last = text;
        } else if !last.ends_with(&text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}
