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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::connector::BoxedIo;
use crate::frames::FrameWatch;
use crate::subchannel::ReadyConn;

/// The h2 connection future of one pool connection.
pub(crate) type H2Connection = h2::client::Connection<FrameWatch<BoxedIo>, Bytes>;

/// When bytes were last read from a connection, for keepalive.
#[derive(Debug)]
pub(crate) struct ReadActivity {
    base: Instant,
    /// Milliseconds after `base` of the last read.
    last_read_ms: AtomicU64,
}

impl ReadActivity {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            last_read_ms: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn touch(&self) {
        let ms = Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64;
        self.last_read_ms.store(ms, Ordering::Relaxed);
    }

    fn last_read(&self) -> Instant {
        self.base + Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed))
    }
}

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
    /// Retired by its slot and its last call ended.
    Retired,
}

/// The slot's handle on its connection's driver.
#[derive(Debug)]
pub(crate) struct DriverHandle {
    ended: oneshot::Receiver<DriverEnd>,
    retire: Option<oneshot::Sender<()>>,
}

impl DriverHandle {
    /// Waits for the driver to end.
    pub(crate) async fn ended(&mut self) -> DriverEnd {
        (&mut self.ended).await.unwrap_or(DriverEnd::Closed(Ok(())))
    }

    /// Lets the connection end once its last call ends.
    pub(crate) fn retire(&mut self) {
        self.retire.take();
    }
}

/// Starts the driver of a Ready connection.
pub(crate) fn spawn(
    connection: H2Connection,
    ready: Arc<ReadyConn>,
    keepalive: Option<KeepAlivePlan>,
) -> DriverHandle {
    let (end_tx, ended) = oneshot::channel();
    let (retire, retire_rx) = oneshot::channel();
    tokio::spawn(async move {
        let end = drive(connection, &ready, keepalive, retire_rx).await;
        ready.mark_closing();
        let _ = end_tx.send(end);
    });
    DriverHandle {
        ended,
        retire: Some(retire),
    }
}

async fn drive(
    mut connection: H2Connection,
    ready: &ReadyConn,
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
            }
            _ = ready.wait_idle(), if retiring => return DriverEnd::Retired,
        }
    }
}

/// Sends keepalive PINGs; completes only when one goes unanswered.
async fn keep_alive(pings: Option<(KeepAlivePlan, h2::PingPong)>, ready: &ReadyConn) -> DriverEnd {
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
