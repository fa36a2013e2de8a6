//! The life of one call: pick a connection (or wait for one), send, retry what never left.
//!
//! `Pool::poll_ready` is always ready: a call's deadline is only known from the request, and
//! tonic's generated clients turn a `poll_ready` error into UNKNOWN. So all waiting happens
//! here, in the response future, bounded by the call's deadline:
//!
//! | pool state | a call without wait-for-ready | with wait-for-ready |
//! |---|---|---|
//! | Ready | sent at once on the next Ready connection | same |
//! | Idle, Connecting | waits for a Ready connection | waits |
//! | TransientFailure | fails fast with UNAVAILABLE | waits |
//! | Shutdown | fails at once (shutdown error, UNAVAILABLE) | same |
//!
//! A deadline that passes while waiting (or before the response headers) fails the call with
//! DEADLINE_EXCEEDED. A request whose stream h2 would not open (its connection closed between
//! the pick and the send) is sent again on another connection; it never reached a server.
//!
//! One more wait, for stream limits: a call that lands past the server's
//! `MAX_CONCURRENT_STREAMS` on its connection, while its endpoint is growing, waits here for
//! a call to end or the next connection to be Ready (at most a second) rather than queueing
//! in HTTP/2 behind that one connection's streams — see `make_room`. A call queued inside h2
//! can never move to another connection; a call waiting here still can.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use tokio::time::Instant;

use crate::body::{transport_error, ResponseBody};
use crate::error::Error;
use crate::exchange::{self, AttemptError};
use crate::registry::Shared;
use crate::replay::Replay;
use crate::state::ConnectivityState;
use crate::subchannel::{InFlightGuard, ReadyConn};

/// How many times a call that provably never reached a server is sent again.
const MAX_TRANSPARENT_RETRIES: usize = 5;

/// A per-call extension: wait for a Ready connection even when every connection is in
/// TransientFailure (gRPC's wait-for-ready), or not, overriding the pool's default.
///
/// ```
/// let mut request = tonic::Request::new(());
/// request.extensions_mut().insert(tonic_pool::WaitForReady(true));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitForReady(pub bool);

/// The options of one call, read from the request.
#[derive(Debug)]
pub(crate) struct CallOptions {
    pub(crate) deadline: Option<Instant>,
    pub(crate) wait_for_ready: bool,
}

impl CallOptions {
    pub(crate) fn from_request<B>(req: &Request<B>, shared: &Shared) -> Self {
        let header = grpc_timeout(req.headers());
        let timeout = match (header, shared.config.timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self {
            deadline: timeout.map(|t| Instant::now() + t),
            wait_for_ready: req
                .extensions()
                .get::<WaitForReady>()
                .map_or(shared.config.wait_for_ready, |w| w.0),
        }
    }
}

/// Parses gRPC's `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u, n).
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs a call to its response headers.
pub(crate) async fn run(
    shared: Arc<Shared>,
    first: Option<InFlightGuard>,
    req: Request<tonic::body::Body>,
    options: CallOptions,
) -> Result<Response<ResponseBody>, Error> {
    let send = send(&shared, first, req, options.wait_for_ready);
    match options.deadline {
        None => send.await,
        Some(deadline) => match tokio::time::timeout_at(deadline, send).await {
            Ok(result) => result,
            Err(_) => Err(Error::deadline_exceeded(match shared.state() {
                ConnectivityState::Ready => "deadline exceeded".to_owned(),
                state => format!("deadline exceeded while waiting for a connection (pool {state})"),
            })),
        },
    }
}

async fn send(
    shared: &Shared,
    mut first: Option<InFlightGuard>,
    req: Request<tonic::body::Body>,
    wait_for_ready: bool,
) -> Result<Response<ResponseBody>, Error> {
    let (parts, body) = req.into_parts();
    let mut replay = Replay::new(body);
    let mut retries = 0;
    loop {
        let guard = match first.take() {
            Some(guard) => guard,
            None => wait_for_connection(shared, wait_for_ready)
                .await?
                .start_call(),
        };
        let guard = make_room(shared, guard, wait_for_ready).await?;
        let ready = guard.conn();
        let (retry, error) = match exchange::attempt(&ready.send, &parts, &mut replay).await {
            Ok((response, unfinished, cursor)) => {
                replay.commit();
                let request_body =
                    unfinished.map(|pipe| pipe.unfinished(replay, cursor).spawn(&shared.runtime));
                return Ok(response.map(|body| ResponseBody::new(body, guard, request_body)));
            }
            Err(AttemptError::Body(status)) => {
                // The caller's own request stream failed: its status is the call's.
                return Err(Error::transport(status.clone(), status));
            }
            Err(AttemptError::Unsent(error)) => {
                // h2 did not open the stream: nothing left this process.
                ready.mark_closing();
                (Retry::Unsent, Some(error))
            }
            Err(AttemptError::Stream(error)) => {
                let never = never_processed(&error).or_else(|| {
                    (is_broken_pipe(&error) && ready.fate.broken_streams_unprocessed())
                        .then_some(Retry::NotOpened)
                });
                match never {
                    Some(retry) if replay.can_replay() => {
                        if retry != Retry::Refused {
                            // Do not wait for the slot to notice the GOAWAY.
                            ready.mark_closing();
                        }
                        (retry, Some(error))
                    }
                    _ => {
                        tracing::debug!(addr = %ready.addr, conn = ready.id, %error, fate = ready.fate.bits(), "call failed on its connection");
                        return Err(transport_error(error));
                    }
                }
            }
        };
        if retries >= MAX_TRANSPARENT_RETRIES {
            return Err(match error {
                Some(err) => transport_error(err),
                None => Error::unavailable("request could not be sent after transparent retries"),
            });
        }
        retries += 1;
        tracing::debug!(addr = %ready.addr, conn = ready.id, ?retry, retries, "transparent retry");
    }
}

/// The longest a call waits in the pool for room before it queues on a full connection.
const MAX_ROOM_WAIT: Duration = Duration::from_secs(1);

/// When the call's connection is full at the server's stream limit and its endpoint can
/// still grow, the call waits in the pool — for a call to end anywhere or for a new
/// connection to be Ready — and picks again, instead of queueing in HTTP/2 behind the
/// streams of that one connection (which, for long calls, can take as long as they do).
/// Bounded: after [`MAX_ROOM_WAIT`] (and within the call's deadline), or as soon as no new
/// connection is coming (at its maximum and all Ready, or one failed), the call takes one
/// last pick and goes where it lands; if that connection is full too, HTTP/2 queues it.
///
/// Each round subscribes to both signals *before* it picks again: a connection that comes up
/// or a call that ends before the subscription is seen by the pick, one after it wakes the
/// wait, so no wake-up falls between the two.
async fn make_room(
    shared: &Shared,
    guard: InFlightGuard,
    wait_for_ready: bool,
) -> Result<InFlightGuard, Error> {
    if !guard.is_beyond_stream_limit() {
        return Ok(guard);
    }
    let give_up = Instant::now() + MAX_ROOM_WAIT;
    // The place held from the last pick, given back only once the signals are subscribed.
    let mut held = Some(guard);
    loop {
        let mut version = shared.subscribe_version();
        version.borrow_and_update();
        let room = shared.room.waiter();
        if let Some(beyond) = held.take() {
            beyond.requeue();
        }
        let guard = wait_for_connection(shared, wait_for_ready)
            .await?
            .start_call();
        let addr = guard.conn().addr;
        if !guard.is_beyond_stream_limit() || Instant::now() >= give_up {
            return Ok(guard);
        }
        if !shared.room_coming(addr) {
            // No connection is coming. But the pick above may predate the state that says
            // so: the last connection growth may open can have become Ready (and calls can
            // have ended) between that pick and this look. One last pick, on a picker at
            // least as new as the state just read, finds such room; if there is none,
            // HTTP/2 queues the call on a full connection.
            guard.requeue();
            return Ok(wait_for_connection(shared, wait_for_ready)
                .await?
                .start_call());
        }
        shared.request_growth(addr);
        // The place is given back for the wait: others may take it meanwhile.
        guard.requeue();
        tokio::select! {
            _ = room => {}
            _ = version.changed() => {}
            _ = tokio::time::sleep_until(give_up) => {}
        }
    }
}

/// Why a call may be sent again: it provably never reached the server's application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
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

/// The error h2 gives streams whose connection went away under them.
fn is_broken_pipe(err: &h2::Error) -> bool {
    err.get_io()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Classifies a send error from the HTTP/2 error, never from the gRPC status (tonic maps
/// these to CANCELLED, INTERNAL or UNKNOWN). h2 reports a *remote* GOAWAY error on a stream
/// only for streams above the GOAWAY's last stream id; streams the server may have processed
/// fail with an I/O error instead when the connection closes.
fn never_processed(h2: &h2::Error) -> Option<Retry> {
    if h2.is_go_away() && h2.is_remote() {
        Some(Retry::GoAway)
    } else if h2.is_reset() && h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Some(Retry::Refused)
    } else {
        None
    }
}

/// Waits until a connection can take the call, per the table in the module docs.
async fn wait_for_connection(
    shared: &Shared,
    wait_for_ready: bool,
) -> Result<Arc<ReadyConn>, Error> {
    let mut version = shared.subscribe_version();
    loop {
        // Mark the current version seen *before* looking, so that a change between the look
        // and the wait wakes the wait.
        version.borrow_and_update();
        if shared.is_shut_down() {
            return Err(Error::shutdown());
        }
        let (_, picker) = shared.load_picker();
        if let Some((conn, all_full)) = picker.pick_reporting(&shared.cursor) {
            if all_full {
                shared.request_growth(conn.addr);
            }
            return Ok(conn.clone());
        }
        match shared.state() {
            ConnectivityState::Shutdown => return Err(Error::shutdown()),
            ConnectivityState::TransientFailure if !wait_for_ready => {
                let last = shared
                    .last_error()
                    .unwrap_or_else(|| "no connection".to_owned());
                return Err(Error::unavailable(format!(
                    "no ready connection (every connection in TRANSIENT_FAILURE); last error: {last}"
                )));
            }
            ConnectivityState::Idle => shared.request_connect(),
            _ => {}
        }
        if version.changed().await.is_err() {
            return Err(Error::shutdown());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(v: &'static str) -> Option<Duration> {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static(v));
        grpc_timeout(&h)
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("400m"), Some(Duration::from_millis(400)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "1", "1x", "-1S", "123456789S", "1.5S"] {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(bad).unwrap());
            assert_eq!(grpc_timeout(&h), None, "{bad:?}");
        }
    }
}
