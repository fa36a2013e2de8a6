//! The task that drives one HTTP/2 connection: its I/O, its PINGs, its retirement.
//!
//! h2's `Connection` future does all reading and writing; calls only queue frames and wait on
//! their streams. This task owns it from the moment the connection is Ready until one of:
//!
//! - the connection ends by itself (the peer closed it, an I/O error, the kill switch);
//! - a keepalive PING is not answered in time (gRFC A8): the connection is dropped, which
//!   fails its streams with UNAVAILABLE;
//! - its slot *retires* it (GOAWAY received, address drained, connection replaced): it stops
//!   taking calls at once, and is dropped once its last call has ended — calls in flight finish.
//!
//! Keepalive follows hyper's rule: a PING goes out only after a full interval in which nothing
//! was read, and (unless `keep_alive_while_idle`) only while calls are in flight.
//!
//! PINGs have two users, keepalive and the BDP estimate of adaptive flow control
//! (`bdp.rs`), and h2 lets one PING of ours be in flight per connection. So one [`Pinger`]
//! owns h2's `PingPong` and serves both, as hyper's ping recorder does: whichever wants a
//! PING first sends it, and its ack answers both — a BDP PING in flight when keepalive comes
//! due is the keepalive PING too (its ack timeout starts then), and a keepalive PING's round
//! trip times a BDP sample under way.

use std::future::{pending, poll_fn};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use crate::conn::bdp::{Estimator, Sample};
use crate::conn::frames::{FrameWatch, ReadActivity};
use crate::conn::ready::Connection;
use crate::connector::BoxedIo;

/// The h2 connection future of one pool connection.
pub(crate) type H2Connection = h2::client::Connection<FrameWatch<BoxedIo>, Bytes>;

/// Keepalive settings of one connection.
#[derive(Debug)]
pub(crate) struct KeepAlivePlan {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) while_idle: bool,
    pub(crate) activity: Arc<ReadActivity>,
}

/// Adaptive flow control of one connection: the sample its byte stream counts DATA into, and
/// the window it starts from.
#[derive(Debug)]
pub(crate) struct BdpPlan {
    pub(crate) sample: Arc<Sample>,
    pub(crate) initial_window: u32,
}

/// What one connection uses PINGs for.
#[derive(Debug, Default)]
pub(crate) struct PingPlan {
    pub(crate) keepalive: Option<KeepAlivePlan>,
    pub(crate) bdp: Option<BdpPlan>,
}

/// How a driver ended.
#[derive(Debug)]
pub(crate) enum DriverEnd {
    /// The connection future completed.
    Closed(Result<(), h2::Error>),
    /// A keepalive PING went unanswered.
    KeepAliveTimeout(Duration),
    /// Retired by its slot, and closed once its last call ended.
    Retired,
}

/// The slot's handle on its connection's driver.
#[derive(Debug)]
pub(crate) struct DriverHandle {
    /// `None` once the end was taken.
    ended: Option<oneshot::Receiver<DriverEnd>>,
    retire: Option<oneshot::Sender<()>>,
}

impl DriverHandle {
    /// Waits for the driver to end; says how, the first time (later calls return at once).
    ///
    /// # Cancel safety
    /// Cancel safe: dropped before it completes, the end is still there for the next call.
    pub(crate) async fn ended(&mut self) -> DriverEnd {
        let Some(rx) = &mut self.ended else {
            return DriverEnd::Retired;
        };
        let end = rx.await.unwrap_or(DriverEnd::Closed(Ok(())));
        self.ended = None;
        end
    }

    /// Whether the driver has ended (its task is gone).
    pub(crate) fn has_ended(&mut self) -> bool {
        let Some(rx) = &mut self.ended else {
            return true;
        };
        match rx.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => false,
            _ => {
                self.ended = None;
                true
            }
        }
    }

    /// Lets the connection end once its last call ends.
    pub(crate) fn retire(&mut self) {
        self.retire.take();
    }
}

/// Starts the driver of a Ready connection.
pub(crate) fn spawn(
    connection: H2Connection,
    ready: Arc<Connection>,
    pings: PingPlan,
) -> DriverHandle {
    let (end_tx, ended) = oneshot::channel();
    let (retire, retire_rx) = oneshot::channel();
    // The driver's events carry its connection's span (address, slot id), as the slot's do.
    let task = async move {
        let end = drive(connection, &ready, pings, retire_rx).await;
        ready.mark_closing();
        let _ = end_tx.send(end);
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    DriverHandle {
        ended: Some(ended),
        retire: Some(retire),
    }
}

/// How long a retired connection with no call left may take to send its GOAWAY and close
/// (h2 writes it and any pending RST_STREAM, then shuts the stream down) before it is dropped.
const RETIRE_FLUSH: Duration = Duration::from_secs(5);

async fn drive(
    mut connection: H2Connection,
    ready: &Connection,
    pings: PingPlan,
    mut retire: oneshot::Receiver<()>,
) -> DriverEnd {
    let mut pinger = Pinger::new(&mut connection, pings);
    let mut retiring = false;
    loop {
        tokio::select! {
            result = &mut connection => return DriverEnd::Closed(result),
            event = pinger.next(ready) => match event {
                PingEvent::KeepAliveTimeout(timeout) => return DriverEnd::KeepAliveTimeout(timeout),
                PingEvent::GrowWindow(window) => {
                    tracing::debug!(window, "BDP estimate: windows grown");
                    // The connection's window at once (a WINDOW_UPDATE); every stream's,
                    // current and future, through SETTINGS_INITIAL_WINDOW_SIZE.
                    connection.set_target_window_size(window);
                    if let Err(error) = connection.set_initial_window_size(window) {
                        tracing::debug!(%error, "window growth not sent");
                    }
                }
            },
            _ = &mut retire, if !retiring => {
                retiring = true;
                ready.mark_closing();
                // With no handle left, h2 closes the connection by itself — GOAWAY(NO_ERROR)
                // first — as soon as its last stream has ended (RFC 9113 §6.8).
                ready.release_sender();
            }
            _ = ready.wait_idle(), if retiring => break,
        }
    }
    // Every call has ended: h2 is closing (or about to, once the streams of the calls that
    // just ended are gone). Bounded, for a peer that stops reading.
    match tokio::time::timeout(RETIRE_FLUSH, &mut connection).await {
        Ok(Err(error)) => DriverEnd::Closed(Err(error)),
        Ok(Ok(())) | Err(_) => DriverEnd::Retired,
    }
}

/// What the [`Pinger`] asks of its driver.
#[derive(Debug, PartialEq, Eq)]
enum PingEvent {
    /// A keepalive PING went unanswered for this long.
    KeepAliveTimeout(Duration),
    /// The BDP estimate grew: the windows become this large.
    GrowWindow(u32),
}

/// Keepalive's part of the [`Pinger`].
struct KeepAliveState {
    plan: KeepAlivePlan,
    /// When to look again whether a PING is due.
    next: Instant,
    /// Set while a PING serves keepalive: the ack must come by then.
    ack_by: Option<Instant>,
}

/// The BDP estimate's part of the [`Pinger`].
struct BdpState {
    sample: Arc<Sample>,
    estimate: Estimator,
    /// When the next sample is due (it is armed then).
    next_sample: Instant,
}

/// The one owner of a connection's PINGs, serving keepalive and the BDP estimate (see the
/// module docs). Its state lives here, not in [`Pinger::next`]'s future, so that the driver
/// may drop that future at every turn of its loop.
struct Pinger {
    /// `None` when no PING is needed, or once h2 refused one (the connection is failing,
    /// and its own future reports how).
    ping_pong: Option<h2::PingPong>,
    /// When the PING in flight was sent.
    sent_at: Option<Instant>,
    keepalive: Option<KeepAliveState>,
    bdp: Option<BdpState>,
}

impl Pinger {
    fn new(connection: &mut H2Connection, plan: PingPlan) -> Self {
        let now = Instant::now();
        let wanted = plan.keepalive.is_some() || plan.bdp.is_some();
        Self {
            ping_pong: if wanted { connection.ping_pong() } else { None },
            sent_at: None,
            keepalive: plan.keepalive.map(|plan| KeepAliveState {
                next: now + plan.interval,
                ack_by: None,
                plan,
            }),
            bdp: plan.bdp.map(|plan| {
                // The first DATA starts the first sample.
                plan.sample.arm();
                BdpState {
                    sample: plan.sample,
                    estimate: Estimator::new(plan.initial_window),
                    next_sample: now,
                }
            }),
        }
    }

    /// Sends a PING unless one is in flight; false if h2 refused it.
    fn send_ping(&mut self) -> bool {
        if self.sent_at.is_some() {
            return true;
        }
        let Some(ping_pong) = &mut self.ping_pong else {
            return false;
        };
        if ping_pong.send_ping(h2::Ping::opaque()).is_err() {
            self.ping_pong = None;
            return false;
        }
        self.sent_at = Some(Instant::now());
        true
    }

    /// Runs the PINGs until the driver must act; never completes without PINGs.
    ///
    /// # Cancel safety
    /// Cancel safe: every wait is on a timer, h2's pong or the sample, and every decision is
    /// written to `self` before the next wait.
    async fn next(&mut self, ready: &Connection) -> PingEvent {
        loop {
            let Some(ping_pong) = &mut self.ping_pong else {
                return pending().await;
            };
            let in_flight = self.sent_at.is_some();
            let ack_by = self.keepalive.as_ref().and_then(|k| k.ack_by);
            let keepalive_check = self
                .keepalive
                .as_ref()
                .filter(|k| k.ack_by.is_none())
                .map(|k| k.next);
            let sample = self.bdp.as_ref().map(|b| (b.sample.clone(), b.next_sample));
            let armed = sample.as_ref().is_some_and(|(s, _)| s.is_armed());
            tokio::select! {
                pong = poll_fn(|cx| ping_pong.poll_pong(cx)), if in_flight => {
                    if pong.is_err() {
                        self.ping_pong = None;
                        continue;
                    }
                    if let Some(event) = self.on_pong() {
                        return event;
                    }
                }
                _ = sleep_until(ack_by), if ack_by.is_some() => {
                    let timeout = self.keepalive.as_ref().map_or(Duration::ZERO, |k| k.plan.timeout);
                    return PingEvent::KeepAliveTimeout(timeout);
                }
                _ = sleep_until(keepalive_check), if keepalive_check.is_some() => {
                    self.keepalive_due(ready);
                }
                _ = async { sample.as_ref().expect("guarded").0.data_counted().await }, if armed && !in_flight => {
                    // Data arrived: the sample's round trip starts now.
                    self.send_ping();
                }
                _ = sleep_until(sample.as_ref().map(|(_, at)| *at)), if sample.is_some() && !armed => {
                    if let Some(bdp) = &self.bdp {
                        bdp.sample.arm();
                    }
                }
            }
        }
    }

    /// Keepalive's timer went off: a PING is due after a full quiet interval, on a connection
    /// with calls (or any, with `while_idle`). A PING already in flight serves.
    fn keepalive_due(&mut self, ready: &Connection) {
        let now = Instant::now();
        let Some(keepalive) = &mut self.keepalive else {
            return;
        };
        let plan = &keepalive.plan;
        let quiet_until = plan.activity.last_read() + plan.interval;
        if quiet_until > now {
            keepalive.next = quiet_until;
            return;
        }
        if !plan.while_idle && ready.in_flight() == 0 {
            keepalive.next = now + plan.interval;
            return;
        }
        keepalive.ack_by = Some(now + plan.timeout);
        self.send_ping();
    }

    /// The PING in flight was acked: keepalive is satisfied, and a BDP sample under way ends.
    fn on_pong(&mut self) -> Option<PingEvent> {
        let now = Instant::now();
        let rtt = now - self.sent_at.take()?;
        if let Some(keepalive) = &mut self.keepalive {
            if keepalive.ack_by.take().is_some() {
                keepalive.next = now + keepalive.plan.interval;
            }
        }
        let bdp = self.bdp.as_mut()?;
        if !bdp.sample.is_armed() {
            return None;
        }
        let bytes = bdp.sample.take();
        let grown = bdp.estimate.sample(bytes, rtt);
        bdp.next_sample = now + bdp.estimate.delay();
        grown.map(PingEvent::GrowWindow)
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::conn::bdp::Sample;
    use crate::conn::ready::{ConnStats, InFlight};
    use crate::test_io::{client_frames, Recorder};

    const TYPE_SETTINGS: u8 = 0x4;
    const TYPE_PING: u8 = 0x6;
    const TYPE_WINDOW_UPDATE: u8 = 0x8;
    const FLAG_ACK: u8 = 0x1;

    /// The PING frames (not acks) the client wrote so far.
    fn pings(written: &Mutex<Vec<u8>>) -> usize {
        client_frames(&written.lock().unwrap())
            .iter()
            .filter(|f| f.kind == TYPE_PING && f.flags & FLAG_ACK == 0)
            .count()
    }

    struct Setup {
        driver: DriverHandle,
        written: Arc<Mutex<Vec<u8>>>,
        /// Dropping it black-holes the server: it keeps the connection but stops reading.
        serve: tokio::sync::oneshot::Sender<()>,
        _server: tokio::task::JoinHandle<()>,
    }

    /// A pool connection (h2 client + driver, keepalive 10 s / 5 s) to a real h2 server over
    /// an in-memory pipe.
    async fn setup(while_idle: bool) -> Setup {
        setup_with(while_idle, None).await
    }

    /// [`setup`], with adaptive flow control sampling into `bdp` when given.
    async fn setup_with(while_idle: bool, bdp: Option<Arc<Sample>>) -> Setup {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (serve, mut stop) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            // Polling the connection answers PINGs; once told to stop it holds the
            // connection without reading, like a peer that went silent.
            tokio::select! {
                _ = async { while conn.accept().await.is_some() {} } => {}
                _ = &mut stop => {}
            }
            pending::<()>().await;
        });
        let (recorder, written) = Recorder::new(client_io);
        let activity = Arc::new(ReadActivity::new());
        let boxed: crate::connector::BoxedIo = Box::new(recorder);
        let (io, watched) = FrameWatch::new(boxed, Some(activity.clone()));
        let (send, connection) = h2::client::handshake(io).await.unwrap();
        let stats = Arc::new(ConnStats::new(
            Arc::new(InFlight::default()),
            Arc::new(crate::growth::Room::default()),
        ));
        let ready = Arc::new(Connection::new(
            0,
            "127.0.0.1:1"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
            send,
            stats,
            watched.fate,
            watched.limits,
        ));
        let plan = KeepAlivePlan {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            while_idle,
            activity,
        };
        Setup {
            driver: spawn(
                connection,
                ready,
                PingPlan {
                    keepalive: Some(plan),
                    bdp: bdp.map(|sample| BdpPlan {
                        sample,
                        initial_window: crate::conn::bdp::INITIAL_WINDOW,
                    }),
                },
            ),
            written,
            serve,
            _server: server,
        }
    }

    /// Without calls and without `keep_alive_while_idle`, no PING is ever sent.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_sends_no_ping() {
        let mut setup = setup(false).await;
        tokio::select! {
            end = setup.driver.ended() => panic!("driver ended: {end:?}"),
            _ = tokio::time::sleep(Duration::from_secs(95)) => {}
        }
        assert_eq!(pings(&setup.written), 0);
    }

    /// With `keep_alive_while_idle`, one PING per quiet interval; acked PINGs keep the
    /// connection.
    #[tokio::test(start_paused = true)]
    async fn pings_go_out_once_per_quiet_interval() {
        let mut setup = setup(true).await;
        tokio::select! {
            end = setup.driver.ended() => panic!("driver ended: {end:?}"),
            _ = tokio::time::sleep(Duration::from_secs(35)) => {}
        }
        // At 10, 20 and 30 s: each ack is a read, so the next PING waits a full interval.
        assert_eq!(pings(&setup.written), 3);
    }

    /// A peer that stops answering is declared dead one interval after its last word plus the
    /// PING timeout, not later.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_ping_ends_the_connection_after_its_timeout() {
        let mut setup = setup(true).await;
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(pings(&setup.written), 1, "one PING, acked at 10 s");
        // The server goes silent at 12 s; its last word was the ack at 10 s.
        drop(setup.serve);
        let silent = Instant::now();
        let end = setup.driver.ended().await;
        assert!(
            matches!(end, DriverEnd::KeepAliveTimeout(t) if t == Duration::from_secs(5)),
            "{end:?}"
        );
        // Next PING at 20 s (10 s after the last read), unanswered until 25 s.
        assert_eq!(silent.elapsed(), Duration::from_secs(13));
        assert_eq!(pings(&setup.written), 2);
    }

    /// Keepalive and the BDP estimate share h2's one PING: a BDP PING still unanswered when
    /// keepalive comes due is the keepalive PING (no second one is sent), and a peer that
    /// went silent is declared dead one quiet interval plus the ack timeout after its last
    /// word, as without BDP.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_bdp_ping_serves_keepalive() {
        let sample = Arc::new(Sample::default());
        let mut setup = setup_with(true, Some(sample.clone())).await;
        // Let the driver arm the first sample, then go silent.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(sample.is_armed());
        drop(setup.serve);
        let silent = Instant::now();
        // DATA arrives (as the byte stream would report it): the sample's PING goes out.
        sample.record_data(1000);
        let end = setup.driver.ended().await;
        assert!(
            matches!(end, DriverEnd::KeepAliveTimeout(t) if t == Duration::from_secs(5)),
            "{end:?}"
        );
        // Due at 10 s (no read since the start), acked by 15 s at the latest: only the BDP
        // PING was ever sent.
        let elapsed = silent.elapsed();
        assert!(
            elapsed >= Duration::from_secs(14) && elapsed <= Duration::from_secs(15),
            "{elapsed:?}"
        );
        assert_eq!(pings(&setup.written), 1);
    }

    /// The SETTINGS frames (not acks) the client wrote so far.
    fn settings(written: &Mutex<Vec<u8>>) -> usize {
        client_frames(&written.lock().unwrap())
            .iter()
            .filter(|f| f.kind == TYPE_SETTINGS && f.flags & FLAG_ACK == 0)
            .count()
    }

    /// BDP PINGs go out only for data and only once a sample is due: none on a quiet
    /// connection; one for the first DATA, whose ack (a window's worth counted) grows the
    /// windows — a new SETTINGS and a connection WINDOW_UPDATE; none for DATA that comes
    /// before the estimate's spacing (100 ms, halved by the growth) has passed; one again after.
    #[tokio::test(start_paused = true)]
    async fn bdp_pings_follow_data_and_are_spaced() {
        let sample = Arc::new(Sample::default());
        let mut setup = setup_with(false, Some(sample.clone())).await;
        let step = tokio::time::sleep;
        step(Duration::from_secs(30)).await;
        assert_eq!(pings(&setup.written), 0, "no data, no PING");
        assert_eq!(settings(&setup.written), 1);

        sample.record_data(60_000);
        step(Duration::from_millis(1)).await;
        assert_eq!(pings(&setup.written), 1);
        assert_eq!(settings(&setup.written), 2, "the grown window announced");
        let window_updates = client_frames(&setup.written.lock().unwrap())
            .iter()
            .filter(|f| f.kind == TYPE_WINDOW_UPDATE && f.stream == 0)
            .count();
        assert_eq!(window_updates, 1);

        // The next sample is due 50 ms after that ack: data before then is not sampled.
        sample.record_data(1_000);
        step(Duration::from_millis(40)).await;
        sample.record_data(1_000);
        step(Duration::from_millis(1)).await;
        assert_eq!(pings(&setup.written), 1);
        step(Duration::from_millis(20)).await;
        sample.record_data(1_000);
        step(Duration::from_millis(1)).await;
        assert_eq!(pings(&setup.written), 2);
        assert!(!setup.driver.has_ended());
    }
}
