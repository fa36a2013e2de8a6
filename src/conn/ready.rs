//! A Ready connection as calls see it: the handle that opens streams, the calls in flight on
//! it, its counters, and whether it still takes calls.
//!
//! The picker holds `Arc<Connection>`s; a call that picks one holds an [`InFlightGuard`] until
//! its response ends, which is what capacity, draining, retirement, `close()` and the
//! least-request policies count. The guard also notes when the call was picked, so that the
//! response's arrival updates the connection's latency estimate (for `Balance::PeakEwma`).

use crate::addr::EndpointAddr;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tonic::Code;

use crate::balance::{Pickable, RttEstimate};
use crate::conn::frames::{ConnFate, PeerLimits};
use crate::growth::Room;
use crate::state::{CallCounts, Counters, Disconnect, Disconnections, Outcome};

/// Counters of one connection slot, kept across its reconnects.
///
/// Always on, so they must cost the call path almost nothing: a call touches `calls` and
/// `last_call` when it starts and one cell of `ended` when it ends, all relaxed (their
/// readers, snapshots, need no ordering with anything else). The rest moves only when a
/// connection comes or goes.
#[derive(Debug)]
pub(crate) struct ConnStats {
    calls: AtomicU64,
    /// Attempts that ended, by [`Outcome::class`].
    ended: [AtomicU64; OUTCOME_CLASSES],
    /// When the last call started: [`crate::balance::now_ns`], plus one (0: never).
    last_call: AtomicU64,
    connects: AtomicU64,
    connect_attempts: AtomicU64,
    connect_failures: AtomicU64,
    /// Disconnections, by [`disconnect_index`].
    disconnections: [AtomicU64; 6],
    /// Connections that received a GOAWAY, by its error code (rare: a lock is fine).
    goaways: Mutex<BTreeMap<u32, u64>>,
    /// The pool's count, which `close()` waits on.
    pool: Arc<InFlight>,
    /// The pool's signal to calls waiting for room.
    room: Arc<Room>,
    /// Where the same counts go as metrics (with the `metrics` feature).
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Option<Arc<crate::metrics::PoolMetrics>>,
}

const OUTCOME_CLASSES: usize = 5;

/// What broke a connection that ended without a GOAWAY ([`Disconnect::Reset`] in the
/// snapshot, which counts them together), told apart for the metrics'
/// `grpc.disconnect_error` (gRFC A94: `connection reset`, `connection aborted`, `socket
/// error`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lost {
    /// Not lost: it ended for another reason (a GOAWAY, a keepalive timeout, the pool's doing).
    No,
    /// An I/O error of this kind (`ConnectionReset` for a peer's RST).
    Io(std::io::ErrorKind),
    /// The peer closed the byte stream without a GOAWAY.
    Eof,
    /// HTTP/2 closed it: a protocol error of the peer's, found on our side.
    Protocol,
}

impl Lost {
    /// gRFC A94's `grpc.disconnect_error` for it: the socket error's kind where there is one
    /// (`connection reset` for a peer's RST), `socket error` for other socket errors and for
    /// a peer that closed the socket without a GOAWAY, `unknown` for HTTP/2 closing it on a
    /// protocol error.
    #[cfg(feature = "metrics")]
    pub(crate) fn disconnect_error(self) -> &'static str {
        use std::io::ErrorKind;
        match self {
            Self::Io(ErrorKind::ConnectionReset) => "connection reset",
            Self::Io(ErrorKind::ConnectionAborted) => "connection aborted",
            Self::Io(ErrorKind::TimedOut) => "connection timed out",
            Self::Io(_) | Self::Eof => "socket error",
            Self::Protocol | Self::No => "unknown",
        }
    }

    /// What the error h2's connection ended with says broke it.
    pub(crate) fn from_h2(error: &h2::Error) -> Self {
        match error.get_io() {
            Some(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => Self::Eof,
            Some(io) => Self::Io(io.kind()),
            None => Self::Protocol,
        }
    }
}

fn disconnect_index(reason: Disconnect) -> usize {
    match reason {
        Disconnect::GoAway(_) => 0,
        Disconnect::Reset => 1,
        Disconnect::KeepAliveTimeout => 2,
        Disconnect::Drained => 3,
        Disconnect::Retired => 4,
        Disconnect::Shutdown => 5,
    }
}

impl ConnStats {
    pub(crate) fn new(pool: Arc<InFlight>, room: Arc<Room>) -> Self {
        Self {
            calls: AtomicU64::new(0),
            ended: Default::default(),
            last_call: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            connect_attempts: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            disconnections: Default::default(),
            goaways: Mutex::new(BTreeMap::new()),
            pool,
            room,
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// With its pool's metrics.
    #[cfg(feature = "metrics")]
    pub(crate) fn with_metrics(mut self, metrics: Arc<crate::metrics::PoolMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// A connection attempt starts.
    pub(crate) fn connect_attempt(&self) {
        self.connect_attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection attempt failed or timed out.
    pub(crate) fn connect_failed(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.connect_failed();
        }
    }

    /// A connection of this slot became Ready.
    pub(crate) fn connected(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.connected();
        }
    }

    pub(crate) fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// A Ready connection of this slot stopped serving; `goaway` is the error code of the
    /// GOAWAY it received, if it did; `lost` what broke a connection lost without one.
    pub(crate) fn disconnected(&self, reason: Disconnect, goaway: Option<u32>, lost: Lost) {
        self.disconnections[disconnect_index(reason)].fetch_add(1, Ordering::Relaxed);
        if let Some(code) = goaway {
            *self.goaways.lock().entry(code).or_default() += 1;
        }
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.disconnected(reason, lost.disconnect_error());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = lost;
    }

    /// An attempt ended.
    #[inline]
    fn ended(&self, outcome: Outcome) {
        self.ended[outcome.class()].fetch_add(1, Ordering::Relaxed);
    }

    /// Everything counted so far.
    pub(crate) fn counters(&self) -> Counters {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let [succeeded, cancelled, unavailable, errors, retried] = self.ended.each_ref().map(load);
        let [goaway, reset, keepalive_timeout, drained, retired, shutdown] =
            self.disconnections.each_ref().map(load);
        Counters {
            calls: CallCounts {
                started: self.calls(),
                succeeded,
                cancelled,
                unavailable,
                errors,
                retried,
            },
            connect_attempts: load(&self.connect_attempts),
            connect_failures: load(&self.connect_failures),
            disconnections: Disconnections {
                goaway,
                reset,
                keepalive_timeout,
                drained,
                retired,
                shutdown,
            },
            goaways: self.goaways.lock().clone(),
            last_call: match load(&self.last_call) {
                0 => None,
                nanos => Some(crate::balance::epoch() + Duration::from_nanos(nanos - 1)),
            },
        }
    }
}

/// Held by a call from the moment it picks a connection until its response body ends or is
/// dropped (a transparent retry drops it and takes a new one).
///
/// Kept small (24 bytes, 72 with the `metrics` feature): it is part of every call's future
/// and of its response body, which tonic moves several times per call (see the note on
/// size at `ResponseBody`).
#[derive(Debug)]
pub(crate) struct InFlightGuard {
    /// The connection the call is on (a field, so that a call can hold it while it updates
    /// the guard's other fields).
    pub(crate) conn: Arc<Connection>,
    /// How many calls the connection counted with this one, when it was picked (saturated:
    /// only compared with a stream limit, itself a `u32`).
    place: u32,
    /// Given back to pick again, not ended: wakes no call waiting for room.
    requeued: bool,
    /// How the attempt ended, once known; an attempt dropped before is counted as cancelled
    /// (its caller gave up, or its deadline passed).
    outcome: Option<Outcome>,
    /// Its metrics (with the `metrics` feature).
    #[cfg(feature = "metrics")]
    pub(crate) metrics: crate::metrics::Attempt,
    /// When the call picked the connection ([`crate::balance::now_ns`]).
    picked_at: u64,
}

impl InFlightGuard {
    /// Records how the attempt ended (counted when the guard is dropped).
    #[inline]
    pub(crate) fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }

    /// Records the gRPC status in `headers` (the trailers), if they carry one.
    #[inline]
    pub(crate) fn set_status_from(&mut self, headers: &http::HeaderMap) {
        if let Some(status) = headers.get("grpc-status") {
            self.outcome = Some(Outcome::Status(Code::from_bytes(status.as_bytes())));
        }
    }

    /// Records the status of a response head: its `grpc-status` (a trailers-only response),
    /// else, for an HTTP status other than 200, the gRPC code that status maps to
    /// (`http-grpc-status-mapping.md`). A 200 without a status waits for the trailers.
    #[inline]
    pub(crate) fn set_status_from_head(
        &mut self,
        status: http::StatusCode,
        headers: &http::HeaderMap,
    ) {
        self.set_status_from(headers);
        if self.outcome.is_none() && status != http::StatusCode::OK {
            let code = match status.as_u16() {
                400 => Code::Internal,
                401 => Code::Unauthenticated,
                403 => Code::PermissionDenied,
                404 => Code::Unimplemented,
                429 | 502 | 503 | 504 => Code::Unavailable,
                _ => Code::Unknown,
            };
            self.outcome = Some(Outcome::Status(code));
        }
    }

    /// When the call picked the connection ([`crate::balance::now_ns`]).
    #[cfg(feature = "metrics")]
    pub(crate) fn picked_at(&self) -> u64 {
        self.picked_at
    }

    /// Whether an outcome was recorded.
    pub(crate) fn has_outcome(&self) -> bool {
        self.outcome.is_some()
    }

    /// The response headers arrived: the time since the pick is a sample of the connection's
    /// latency (tower's `CompleteOnResponse`: what the server took, not how long a stream
    /// stays open).
    pub(crate) fn response_arrived(&self) {
        let now = crate::balance::now_ns();
        self.conn.rtt.observe(std::time::Duration::from_nanos(
            now.saturating_sub(self.picked_at),
        ));
    }
}

impl crate::growth::Place for InFlightGuard {
    fn addr(&self) -> EndpointAddr {
        self.conn.addr.clone()
    }

    /// HTTP/2 would queue the call until one of the calls before it on its connection ends.
    fn is_beyond_stream_limit(&self) -> bool {
        self.place > self.conn.limits.max_concurrent_streams()
    }

    fn requeue(mut self) {
        self.requeued = true;
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.conn.in_flight.dec();
        let stats = &self.conn.stats;
        stats.pool.dec();
        if self.requeued {
            // Not an attempt after all: the call picks again.
            stats.calls.fetch_sub(1, Ordering::Relaxed);
        } else {
            stats.room.freed();
            let outcome = self.outcome.unwrap_or(Outcome::Status(Code::Cancelled));
            stats.ended(outcome);
            #[cfg(feature = "metrics")]
            if let Some(metrics) = &stats.metrics {
                // The attempt's one clock read of its own: its end.
                let now = crate::balance::now_ns();
                self.metrics.ended(metrics, self.picked_at, now, outcome);
            }
        }
    }
}

/// A Ready connection as the picker holds it.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) id: u64,
    pub(crate) addr: EndpointAddr,
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
    /// Whether the server's health Watch says SERVING (always, without health checking): the
    /// connection's health, set before the registry republishes the picker on a change, so that
    /// a picker published before that skips it too (see [`crate::conn::health`]).
    #[cfg(feature = "health")]
    serving: AtomicBool,
    /// Its response times, for `Balance::PeakEwma` (a new connection starts from the default).
    rtt: RttEstimate,
}

impl Connection {
    pub(crate) fn new(
        id: u64,
        addr: EndpointAddr,
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
            #[cfg(feature = "health")]
            serving: AtomicBool::new(true),
            rtt: RttEstimate::new(),
        }
    }

    /// Records what the server's health Watch says: only a serving connection is picked.
    #[cfg(feature = "health")]
    pub(crate) fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    #[inline]
    fn is_serving(&self) -> bool {
        #[cfg(feature = "health")]
        return self.serving.load(Ordering::Acquire);
        #[cfg(not(feature = "health"))]
        true
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
    pub(crate) async fn replacement_requested(&self) -> String {
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
        let stats = &self.stats;
        stats.calls.fetch_add(1, Ordering::Relaxed);
        // One clock read per call: the connection's last call and the pick time that the
        // response's arrival turns into a latency sample (`Balance::PeakEwma`).
        let now = crate::balance::now_ns();
        stats
            .last_call
            .store(now.saturating_add(1), Ordering::Relaxed);
        let place = u32::try_from(self.in_flight.inc()).unwrap_or(u32::MAX);
        stats.pool.inc();
        InFlightGuard {
            conn: Arc::clone(self),
            place,
            requeued: false,
            outcome: None,
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::Attempt::default(),
            picked_at: now,
        }
    }
}

impl Pickable for Arc<Connection> {
    #[inline]
    fn is_available(&self) -> bool {
        !self.closing.load(Ordering::Acquire) && !self.fate.goaway_received() && self.is_serving()
    }

    #[inline]
    fn has_capacity(&self) -> bool {
        (Connection::in_flight(self) as u64) < u64::from(self.limits.max_concurrent_streams())
    }

    #[inline]
    fn in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::Relaxed)
    }

    #[inline]
    fn rtt(&self) -> Option<&RttEstimate> {
        Some(&self.rtt)
    }
}

/// A counter of calls in flight with a wake-up when it reaches zero, for the pool as a whole
/// (`close()` waits on it) and for each connection (draining waits on it).
///
/// The wake-up is only paid for when someone waits: `Notify::notify_waiters` takes a lock,
/// and at one call in flight the count reaches zero on every call. A waiter raises `watched`
/// before it checks the count, the last decrement checks `watched` after it lowered the
/// count; with both sides `SeqCst` one of them always sees the other (the waiter sees zero,
/// or the decrement sees the waiter).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    watched: AtomicBool,
    zero: Notify,
}

impl InFlight {
    /// Counts one more; returns the count with it.
    #[inline]
    pub(crate) fn inc(&self) -> usize {
        self.count.fetch_add(1, Ordering::Relaxed) + 1
    }

    #[inline]
    pub(crate) fn dec(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 && self.watched.load(Ordering::SeqCst) {
            self.zero.notify_waiters();
        }
    }

    pub(crate) fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until no call is in flight.
    pub(crate) async fn wait_zero(&self) {
        self.watched.store(true, Ordering::SeqCst);
        loop {
            let notified = self.zero.notified();
            tokio::pin!(notified);
            // Register before checking, so a decrement between the check and the await is seen.
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InFlight;
    use std::sync::Arc;

    /// The last decrement wakes a waiter, whether the waiter came before or after it.
    #[tokio::test]
    async fn zero_wakes_waiters() {
        let count = Arc::new(InFlight::default());
        count.inc();
        count.inc();
        let waiter = tokio::spawn({
            let count = count.clone();
            async move { count.wait_zero().await }
        });
        tokio::task::yield_now().await;
        count.dec();
        assert!(!waiter.is_finished());
        count.dec();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        // Nothing in flight: returns at once.
        count.wait_zero().await;
    }
}
