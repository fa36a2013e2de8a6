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
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};

use crate::backoff::Backoff;
use crate::connector::{Connect, Destination};
use crate::driver::{DriverEnd, DriverHandle, H2Connection, KeepAlivePlan, ReadActivity};
use crate::error::BoxError;
use crate::frames::{ConnFate, FrameWatch, GoAway, KillSwitch, PeerLimits, Watched};
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
    /// The handle that opens streams; taken away when the connection retires, so that h2,
    /// holding no handle and no stream any more, sends GOAWAY(NO_ERROR) and closes by itself.
    /// A read lock per call (uncontended: a writer comes once, at retirement).
    send: RwLock<Option<h2::client::SendRequest<Bytes>>>,
    pub(crate) stats: Arc<ConnStats>,
    /// Calls on this connection; its capacity, draining and retirement go by it.
    in_flight: InFlight,
    /// Set the moment the connection must take no new call (GOAWAY seen, draining, lost,
    /// retired), before the registry republishes the picker.
    closing: AtomicBool,
    /// Set by a call that found the connection unable to open streams (its ids are used up,
    /// it failed): the slot replaces it. Wakes the slot through `replace`.
    replace_reason: Mutex<Option<String>>,
    replace: Notify,
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
            send: RwLock::new(Some(send)),
            stats,
            in_flight: InFlight::default(),
            closing: AtomicBool::new(false),
            replace_reason: Mutex::new(None),
            replace: Notify::new(),
            fate,
            limits,
        }
    }

    /// A handle to open one stream, or `None` once the connection has retired.
    pub(crate) fn sender(&self) -> Option<h2::client::SendRequest<Bytes>> {
        self.send.read().clone()
    }

    /// Gives up the handle that opens streams: h2 closes the connection gracefully (GOAWAY
    /// with NO_ERROR, pending frames flushed) once its last stream has ended.
    pub(crate) fn release_sender(&self) {
        self.send.write().take();
    }

    pub(crate) fn mark_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// Takes the connection out of use and asks its slot to replace it: a call found that it
    /// cannot open streams any more. Calls in flight on it still finish.
    pub(crate) fn request_replacement(&self, reason: impl Into<String>) {
        self.mark_closing();
        let mut slot = self.replace_reason.lock();
        if slot.is_none() {
            *slot = Some(reason.into());
            // `notify_one` keeps a permit if the slot is not waiting at this instant.
            self.replace.notify_one();
        }
    }

    /// Completes once a call asked for this connection to be replaced; returns why.
    async fn replacement_requested(&self) -> String {
        loop {
            if let Some(reason) = self.replace_reason.lock().clone() {
                return reason;
            }
            self.replace.notified().await;
        }
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
        !self.closing.load(Ordering::Acquire) && !self.fate.goaway_received()
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
    /// A call found that the connection cannot open streams any more (e.g. its stream ids
    /// are used up): replace it.
    Replace(String),
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

/// The slot's task. Ends on `Drain` (after its calls finish), `Shutdown`, or (a grown
/// connection) idle retirement — and only once every connection it opened has ended, so that
/// `close()` returning means no connection task is left.
pub(crate) async fn run(slot: Slot) {
    let mut retired = Retired::default();
    let reason = serve(&slot, &mut retired).await;
    let Slot {
        shared,
        id,
        mut control,
        ..
    } = slot;
    let ended = retired
        .wind_down(&mut control, shared.config.drain_timeout)
        .await;
    let reason = match (reason, ended) {
        ("drained", WindDown::Cut) => "drain cut short",
        (reason, _) => reason,
    };
    finish(&shared, id, reason);
}

/// Connects, serves and reconnects until the slot must end; returns why. Connections that
/// stop serving are handed to `retired`, where their calls finish.
async fn serve(slot: &Slot, retired: &mut Retired) -> &'static str {
    let Slot {
        shared,
        id,
        addr,
        stats,
        connector,
        keepalive,
        control,
        seed,
        retire_when_idle,
    } = slot;
    let (shared, id, addr) = (&**shared, *id, *addr);
    let mut control = control.clone();
    let mut backoff = Backoff::new(shared.config.backoff.clone(), *seed);
    let mut connect_rx = shared.subscribe_connect();
    // Stay Idle until the pool is asked to connect (at once unless it is lazy).
    tokio::select! {
        biased;
        _ = wait_until(&mut control, |c| *c != Control::Run) => return "closed while idle",
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
            return "closed";
        }
        shared.transition(id, ConnectivityState::Connecting, "connecting", None);
        let timeout = shared
            .config
            .connect_timeout
            .unwrap_or_else(|| backoff.connect_timeout());
        let attempt = tokio::time::timeout(
            timeout,
            connect(shared, &**connector, &dst, keepalive.interval()),
        );
        let result = tokio::select! {
            biased;
            _ = wait_until(&mut control, |c| *c != Control::Run) => return "closed while connecting",
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
                fail_and_wait(shared, id, &reason, &mut backoff, &mut control).await;
                continue;
            }
            Err(_) => {
                let reason = format!("connect timeout after {timeout:?}");
                fail_and_wait(shared, id, &reason, &mut backoff, &mut control).await;
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
            reason = ready.replacement_requested() => ServeEnd::Replace(reason),
            _ = idle_for(&ready, *retire_when_idle) => ServeEnd::Idle,
        };
        // No new call goes to this connection from here on, even through stale pickers.
        ready.mark_closing();
        // Calls in flight finish on it; the slot keeps it until it has ended.
        driver.retire();
        retired.push(Live {
            ready,
            driver,
            kill,
        });
        match end {
            ServeEnd::GracefulGoAway => {
                shared.transition(id, ConnectivityState::Idle, "GOAWAY from server", None);
                shared.request_reresolve();
            }
            ServeEnd::Replace(reason) => {
                // Nothing is wrong with the server: reconnect at once.
                shared.transition(id, ConnectivityState::Idle, &reason, None);
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
            }
            ServeEnd::Lost(reason) => {
                shared.transition(id, ConnectivityState::TransientFailure, &reason, None);
                shared.request_reresolve();
            }
            // Out of the picker already (the endpoint is draining); calls finish in the
            // wind-down, bounded by the drain timeout.
            ServeEnd::Drain => return "drained",
            // Not needed any more: calls that picked it just now still finish on it.
            ServeEnd::Idle => return "idle: grown connection retired",
            // close() already gave calls in flight their time (or the last handle was
            // dropped): whatever still runs is cut in the wind-down, so that no connection
            // outlives the pool.
            ServeEnd::Shutdown => return "pool closed",
        }
    }
}

/// A connection the slot opened, with the handles to end it.
struct Live {
    ready: Arc<ReadyConn>,
    driver: DriverHandle,
    kill: Arc<KillSwitch>,
}

/// The connections a slot has retired whose calls may still be running. The pool tracks
/// every live connection until it ends: `close()` and draining can cut them, and the slot
/// does not end before they have.
#[derive(Default)]
struct Retired(Vec<Live>);

/// How a slot's retired connections ended.
#[derive(Debug, PartialEq, Eq)]
enum WindDown {
    /// Each ended once its calls were done.
    Finished,
    /// Calls were still running when the pool closed or the drain timed out: they were cut.
    Cut,
}

/// How long connections with nothing in flight may take to close gracefully at shutdown
/// before they are cut (h2 needs one flush of its GOAWAY).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

impl Retired {
    /// Adds a retired connection, forgetting those that have ended meanwhile.
    fn push(&mut self, live: Live) {
        self.0.retain_mut(|l| !l.driver.has_ended());
        self.0.push(live);
    }

    /// Waits until every retired connection has ended.
    async fn all_ended(&mut self) {
        for live in &mut self.0 {
            live.driver.ended().await;
        }
    }

    /// Cuts every connection that still carries calls (or all of them).
    fn cut(&self, all: bool) -> bool {
        let mut cut = false;
        for live in &self.0 {
            if all || live.ready.in_flight() > 0 {
                live.kill.kill();
                cut = true;
            }
        }
        cut
    }

    /// Lets the retired connections end the way `control` says: on `Shutdown` at once (calls
    /// still running are cut; idle connections close with GOAWAY); on `Drain` once their calls
    /// end, cut after `drain_timeout`; while still running (an idle retirement) once their
    /// calls end, however long that takes — unless a drain or shutdown comes first.
    async fn wind_down(
        &mut self,
        control: &mut watch::Receiver<Control>,
        drain_timeout: Duration,
    ) -> WindDown {
        let drain_deadline = tokio::time::Instant::now() + drain_timeout;
        loop {
            let mode = *control.borrow_and_update();
            match mode {
                Control::Shutdown => {
                    let mut cut = self.cut(false);
                    if tokio::time::timeout(SHUTDOWN_FLUSH, self.all_ended())
                        .await
                        .is_err()
                    {
                        cut |= self.cut(true);
                        self.all_ended().await;
                    }
                    return if cut {
                        WindDown::Cut
                    } else {
                        WindDown::Finished
                    };
                }
                Control::Drain => {
                    tokio::select! {
                        biased;
                        _ = control.changed() => continue,
                        _ = self.all_ended() => return WindDown::Finished,
                        _ = tokio::time::sleep_until(drain_deadline) => {
                            self.cut(true);
                            self.all_ended().await;
                            return WindDown::Cut;
                        }
                    }
                }
                Control::Run => {
                    tokio::select! {
                        biased;
                        changed = control.changed() => {
                            if changed.is_err() {
                                // The worker is gone without a word: treat it as a shutdown.
                                self.cut(true);
                                self.all_ended().await;
                                return WindDown::Cut;
                            }
                        }
                        _ = self.all_ended() => return WindDown::Finished,
                    }
                }
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

/// How many streams we reset (cancelled calls) h2 remembers per connection, so that the
/// server's late frames for them are ignored rather than counted as protocol errors: 10 s of
/// 400 cancellations a second per connection.
const RESET_STREAMS_REMEMBERED: usize = 4096;
/// How long h2 remembers a stream we reset (late frames take about one round trip).
const RESET_STREAM_MEMORY: Duration = Duration::from_secs(10);

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
        .enable_push(false)
        // Cancelling a call resets its stream; the server's frames already on their way for
        // it arrive after. h2 ignores them only while it remembers the reset (by default 50
        // streams for 1 s); past that it resets the "unknown" stream again and counts that as
        // a protocol error of the peer's, closing the connection (ENHANCE_YOUR_CALM,
        // `too_many_internal_resets`) after 1 024 — under a storm of deadlines that took every
        // connection down every half minute. Remembering more resets for longer keeps ordinary
        // cancellation from counting, while the limit on real protocol errors stays as it is.
        .max_concurrent_reset_streams(RESET_STREAMS_REMEMBERED)
        .reset_stream_duration(RESET_STREAM_MEMORY);
    #[cfg(test)]
    if let Some(id) = config.initial_stream_id {
        builder.initial_stream_id(id);
    }
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
