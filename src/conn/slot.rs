//! A connection slot: gRPC's connectivity state machine for one connection to one address,
//! with its own backoff.
//!
//! ```text
//! loop:
//!   Idle while the pool is (lazy and unused yet, or idle mode): wait for the next call
//!   Connecting ── TCP + handshake + server SETTINGS (bounded by the connect timeout)
//!     ├─ ok  → Ready (published to the picker); backoff reset
//!     │        wait: connection ends │ GOAWAY │ replacement asked │ drain │ shutdown │ idle (grown)
//!     │              │ pool idle (idle mode: retire the connection, back to the top)
//!     │        GOAWAY(NO_ERROR), replacement → Idle, reconnect at once
//!     │        lost, GOAWAY with an error    → TransientFailure, reconnect at once (first try free)
//!     └─ err → TransientFailure; sleep backoff (cut short by `reset_connect_backoff`, which
//!              also restarts it, or by the pool going idle); retry
//! ```
//!
//! A connection that stops serving is *retired*, not dropped: it takes no new call, its calls
//! in flight finish, and once the last one has it closes with GOAWAY(NO_ERROR). The slot keeps
//! every connection it retired until that connection has ended — `close()` and a drain's
//! timeout cut them like the current one, and the slot task (so `close()`) ends only after
//! all of them have.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::conn::connect::connect;
use crate::conn::driver::{DriverEnd, DriverHandle};
use crate::conn::events::SlotEvents;
use crate::conn::frames::{GoAway, KillSwitch, Watched};
use crate::conn::ready::{ConnStats, Connection, Lost};
use crate::connector::{Connect, Destination};
use crate::endpoint::KeepAlive;
use crate::error::error_chain;
use crate::growth::idle_for;
use crate::state::{wait_until, ConnectivityState, Disconnect};

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
    /// The pool went Idle (idle mode): close the connection, wait for the next call.
    PoolIdle,
    /// A call found that the connection cannot open streams any more (e.g. its stream ids
    /// are used up): replace it.
    Replace(String),
}

/// Everything a slot's task is started with.
pub(crate) struct Slot {
    pub(crate) id: u64,
    pub(crate) dst: Destination,
    pub(crate) config: Arc<Config>,
    pub(crate) events: Arc<dyn SlotEvents>,
    /// Turns true when the pool is asked to leave Idle, false when it goes Idle (idle mode).
    pub(crate) connect_requested: watch::Receiver<bool>,
    /// Bumped by `Pool::reset_connect_backoff`.
    pub(crate) backoff_resets: watch::Receiver<u64>,
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

impl ServeEnd {
    /// The reason it is counted under, given the code of the GOAWAY the connection received.
    fn disconnect(&self, goaway: Option<u32>, keepalive_timed_out: bool) -> Disconnect {
        match (self, goaway) {
            (Self::GracefulGoAway | Self::TooManyPings | Self::Lost(_), Some(code)) => {
                Disconnect::GoAway(code)
            }
            (Self::GracefulGoAway, None) => Disconnect::GoAway(crate::conn::frames::NO_ERROR),
            (Self::TooManyPings, None) => {
                Disconnect::GoAway(crate::conn::frames::ENHANCE_YOUR_CALM)
            }
            (Self::Lost(_), None) if keepalive_timed_out => Disconnect::KeepAliveTimeout,
            (Self::Lost(_), None) => Disconnect::Reset,
            (Self::Drain, _) => Disconnect::Drained,
            (Self::Shutdown, _) => Disconnect::Shutdown,
            // Idle mode closes a connection as growth retires one: on purpose, gracefully.
            (Self::Idle | Self::PoolIdle | Self::Replace(_), _) => Disconnect::Retired,
        }
    }
}

/// The slot's task. Ends on `Drain` (after its calls finish), `Shutdown`, or (a grown
/// connection) idle retirement — and only once every connection it opened has ended, so that
/// `close()` returning means no connection task is left.
pub(crate) async fn run(slot: Slot) {
    #[cfg(feature = "metrics")]
    if let (Some(_), Some(metrics)) = (slot.retire_when_idle, &slot.stats.metrics) {
        // Only growth opens slots that retire when idle.
        metrics.grown();
    }
    let mut retired = Retired::default();
    let reason = serve(&slot, &mut retired).await;
    let Slot {
        id,
        config,
        events,
        mut control,
        ..
    } = slot;
    let ended = retired.wind_down(&mut control, config.drain_timeout).await;
    let reason = match (reason, ended) {
        ("drained", WindDown::Cut) => {
            tracing::warn!(timeout = ?config.drain_timeout, "drain timed out: calls still in flight were cut");
            "drain cut short"
        }
        (reason, _) => reason,
    };
    events.transition(id, ConnectivityState::Shutdown, reason, None);
    events.removed(id);
}

/// Connects, serves and reconnects until the slot must end; returns why. Connections that
/// stop serving are handed to `retired`, where their calls finish.
async fn serve(slot: &Slot, retired: &mut Retired) -> &'static str {
    let Slot {
        id,
        dst,
        config,
        events,
        connect_requested,
        stats,
        connector,
        keepalive,
        control,
        seed,
        retire_when_idle,
        backoff_resets,
    } = slot;
    let (events, id, addr) = (&**events, *id, dst.addr.clone());
    let mut control = control.clone();
    let mut backoff = Backoff::new(config.backoff.clone(), *seed);
    let mut connect_rx = connect_requested.clone();
    let mut backoff_resets = backoff_resets.clone();
    loop {
        if *control.borrow() != Control::Run {
            return "closed";
        }
        // Stay Idle until the pool is asked to connect: at once unless it is lazy, and again
        // after idle mode sent it back to Idle.
        if !*connect_rx.borrow() {
            events.transition(id, ConnectivityState::Idle, "pool idle", None);
            tokio::select! {
                biased;
                _ = wait_until(&mut control, |c| *c != Control::Run) => return "closed while idle",
                _ = wait_until(&mut connect_rx, |requested| *requested) => {}
            }
            // A pool that comes back from Idle starts afresh, as a new gRPC channel would.
            backoff.reset();
        }
        events.transition(id, ConnectivityState::Connecting, "connecting", None);
        stats.connect_attempt();
        let timeout = config
            .connect_timeout
            .unwrap_or_else(|| backoff.connect_timeout());
        let attempt = tokio::time::timeout(
            timeout,
            connect(config, &**connector, dst, keepalive.interval()),
        );
        let result = tokio::select! {
            biased;
            _ = wait_until(&mut control, |c| *c != Control::Run) => return "closed while connecting",
            // The pool went Idle meanwhile: the attempt is not needed any more.
            _ = wait_until(&mut connect_rx, |requested| !*requested) => continue,
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
            pings,
        ) = match result {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => {
                stats.connect_failed();
                let reason = format!("connect error: {}", error_chain(&*e));
                let mut waits = Waits::new(&mut control, &mut connect_rx, &mut backoff_resets);
                fail_and_wait(events, id, &reason, &mut backoff, &mut waits).await;
                continue;
            }
            Err(_) => {
                stats.connect_failed();
                let reason = format!("connect timeout after {timeout:?}");
                let mut waits = Waits::new(&mut control, &mut connect_rx, &mut backoff_resets);
                fail_and_wait(events, id, &reason, &mut backoff, &mut waits).await;
                continue;
            }
        };
        backoff.reset();
        // A reset asked while this attempt ran has been served by its success.
        backoff_resets.borrow_and_update();
        stats.connected();
        let ready = Arc::new(Connection::new(
            id,
            addr.clone(),
            send,
            stats.clone(),
            fate,
            limits,
        ));
        let mut driver = crate::conn::driver::spawn(connection, ready.clone(), pings);
        let mut goaway_rx = signals.clone();
        let mut keepalive_timed_out = false;
        let mut lost = Lost::No;
        let serving = async {
            tokio::select! {
                biased;
                c = wait_until(&mut control, |c| *c != Control::Run) => match c {
                    Some(Control::Drain) => ServeEnd::Drain,
                    _ => ServeEnd::Shutdown,
                },
                end = driver.ended() => {
                    // A GOAWAY read just before the end explains it better than h2's result.
                    let goaway = signals.borrow().goaway.clone();
                    ServeEnd::after(goaway, || match end {
                        DriverEnd::Closed(Ok(())) => {
                            lost = Lost::Eof;
                            "connection closed".to_owned()
                        }
                        DriverEnd::Retired => "connection closed".to_owned(),
                        DriverEnd::Closed(Err(e)) => {
                            lost = Lost::from_h2(&e);
                            format!("connection lost: {}", error_chain(&e))
                        }
                        DriverEnd::KeepAliveTimeout(t) => {
                            keepalive_timed_out = true;
                            format!("connection lost: keepalive PING not acknowledged within {t:?}")
                        }
                    })
                }
                g = wait_until(&mut goaway_rx, |s| s.goaway.is_some()) => {
                    ServeEnd::after(g.and_then(|s| s.goaway), || "connection closed".to_owned())
                }
                reason = ready.replacement_requested() => ServeEnd::Replace(reason),
                _ = wait_until(&mut connect_rx, |requested| !*requested) => ServeEnd::PoolIdle,
                _ = idle_for(*retire_when_idle, || (ready.stats.calls(), ready.in_flight())) => ServeEnd::Idle,
            }
        };
        let end = serve_ready(slot, &ready, serving).await;
        let goaway = signals.borrow().goaway.as_ref().map(|g| g.error_code);
        stats.disconnected(end.disconnect(goaway, keepalive_timed_out), goaway, lost);
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
                events.transition(id, ConnectivityState::Idle, "GOAWAY from server", None);
                events.reresolve();
            }
            ServeEnd::Replace(reason) => {
                // Nothing is wrong with the server: reconnect at once.
                events.transition(id, ConnectivityState::Idle, &reason, None);
            }
            // Idle at the top of the loop until the next call; the connection closes with
            // GOAWAY once the calls that picked it just now have ended.
            ServeEnd::PoolIdle => {}
            ServeEnd::TooManyPings => {
                let interval = keepalive.double();
                tracing::warn!(?interval, "server sent GOAWAY too_many_pings; keepalive interval doubled for this endpoint");
                events.transition(
                    id,
                    ConnectivityState::TransientFailure,
                    "GOAWAY ENHANCE_YOUR_CALM too_many_pings",
                    None,
                );
                events.reresolve();
            }
            ServeEnd::Lost(reason) => {
                events.transition(id, ConnectivityState::TransientFailure, &reason, None);
                events.reresolve();
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

/// Reports the connection Ready and waits for `serving` (the end of its service). With
/// health checking (gRFC A17) the connection is Ready only once its server's Watch says
/// SERVING: the Watch runs beside the wait, reports the connection's state as it changes, and
/// ends with it.
async fn serve_ready(
    slot: &Slot,
    ready: &Arc<Connection>,
    serving: impl std::future::Future<Output = ServeEnd>,
) -> ServeEnd {
    #[cfg(feature = "health")]
    if let Some(service) = slot.config.health_check.as_deref() {
        let health = crate::conn::health::watch(crate::conn::health::HealthWatch {
            service,
            config: &slot.config,
            dst: &slot.dst,
            ready,
            events: &*slot.events,
            id: slot.id,
            seed: slot.seed,
        });
        return tokio::select! {
            biased;
            end = serving => end,
            never = health => match never {},
        };
    }
    slot.events.transition(
        slot.id,
        ConnectivityState::Ready,
        "server settings received",
        Some(ready.clone()),
    );
    serving.await
}

/// A connection the slot opened, with the handles to end it.
struct Live {
    ready: Arc<Connection>,
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

/// What a slot backing off listens to besides its timer.
struct Waits<'a> {
    control: &'a mut watch::Receiver<Control>,
    connect_requested: &'a mut watch::Receiver<bool>,
    backoff_resets: &'a mut watch::Receiver<u64>,
}

impl<'a> Waits<'a> {
    fn new(
        control: &'a mut watch::Receiver<Control>,
        connect_requested: &'a mut watch::Receiver<bool>,
        backoff_resets: &'a mut watch::Receiver<u64>,
    ) -> Self {
        Self {
            control,
            connect_requested,
            backoff_resets,
        }
    }
}

/// Reports the failure and sleeps the backoff delay. The sleep ends early when the slot must
/// stop, when the pool goes Idle, or on `Pool::reset_connect_backoff` — which also restarts
/// the backoff from its initial delay, as does a reset asked while the attempt ran.
async fn fail_and_wait(
    events: &dyn SlotEvents,
    id: u64,
    reason: &str,
    backoff: &mut Backoff,
    waits: &mut Waits<'_>,
) {
    events.transition(id, ConnectivityState::TransientFailure, reason, None);
    events.reresolve();
    if waits.backoff_resets.has_changed().unwrap_or(false) {
        waits.backoff_resets.borrow_and_update();
        backoff.reset();
        tracing::debug!(conn = id, "backoff reset; retrying at once");
        return;
    }
    let delay = backoff.next_delay();
    tracing::debug!(?delay, "backing off");
    tokio::select! {
        biased;
        _ = wait_until(waits.control, |c| *c != Control::Run) => {}
        _ = wait_until(waits.connect_requested, |requested| !*requested) => {}
        Ok(()) = waits.backoff_resets.changed() => {
            backoff.reset();
            tracing::debug!(conn = id, "backoff reset; retrying at once");
        }
        _ = tokio::time::sleep(delay) => {}
    }
}
