//! The task that drives one HTTP/2 connection: its I/O, its keepalive PINGs, its retirement.
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

use std::future::{pending, poll_fn};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

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
    keepalive: Option<KeepAlivePlan>,
) -> DriverHandle {
    let (end_tx, ended) = oneshot::channel();
    let (retire, retire_rx) = oneshot::channel();
    // The driver's events carry its connection's span (address, slot id), as the slot's do.
    let task = async move {
        let end = drive(connection, &ready, keepalive, retire_rx).await;
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
    keepalive: Option<KeepAlivePlan>,
    mut retire: oneshot::Receiver<()>,
) -> DriverEnd {
    let pings = keepalive.and_then(|plan| connection.ping_pong().map(|pp| (plan, pp)));
    let keepalive = keep_alive(pings, ready);
    tokio::pin!(keepalive);
    let mut retiring = false;
    loop {
        tokio::select! {
            result = &mut connection => return DriverEnd::Closed(result),
            end = &mut keepalive => return end,
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

/// Sends keepalive PINGs; completes only when one goes unanswered.
async fn keep_alive(pings: Option<(KeepAlivePlan, h2::PingPong)>, ready: &Connection) -> DriverEnd {
    let Some((plan, mut ping_pong)) = pings else {
        return pending().await;
    };
    let mut next = Instant::now() + plan.interval;
    loop {
        tokio::time::sleep_until(next).await;
        let now = Instant::now();
        let quiet_until = plan.activity.last_read() + plan.interval;
        if quiet_until > now {
            next = quiet_until;
            continue;
        }
        if !plan.while_idle && ready.in_flight() == 0 {
            next = now + plan.interval;
            continue;
        }
        if ping_pong.send_ping(h2::Ping::opaque()).is_err() {
            // The connection is failing; its own future reports how.
            return pending().await;
        }
        let pong = poll_fn(|cx| ping_pong.poll_pong(cx));
        match tokio::time::timeout(plan.timeout, pong).await {
            Ok(Ok(_)) => next = Instant::now() + plan.interval,
            Ok(Err(_)) => return pending().await,
            Err(_) => return DriverEnd::KeepAliveTimeout(plan.timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::conn::ready::{ConnStats, InFlight};
    use crate::test_io::{client_frames, Recorder};

    const TYPE_PING: u8 = 0x6;
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
            "127.0.0.1:1".parse().unwrap(),
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
            driver: spawn(connection, ready, Some(plan)),
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
}
