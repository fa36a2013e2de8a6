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

/// How many times a call that no connection took (it never left this process, or its
/// connection was going away) is sent again, each time on another connection.
const MAX_UNSENT_RETRIES: usize = 5;

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
    let mut retries = Retries::default();
    // A connection that refused the call: its retry goes to another one if there is one.
    let mut avoid = None;
    loop {
        let guard = match first.take() {
            Some(guard) => guard,
            None => wait_for_connection(shared, wait_for_ready, avoid)
                .await?
                .start_call(),
        };
        let guard = make_room(shared, guard, wait_for_ready).await?;
        let ready = guard.conn();
        let Some(sender) = ready.sender() else {
            // The connection retired between the pick and here: nothing was sent.
            retries.count(Retry::Unsent, None)?;
            continue;
        };
        let (retry, error) = match exchange::attempt(sender, &parts, &mut replay).await {
            Ok((response, unfinished, cursor)) => {
                replay.commit(&cursor);
                let request_body =
                    unfinished.map(|pipe| pipe.unfinished(replay, cursor).spawn(&shared.runtime));
                return Ok(response.map(|body| ResponseBody::new(body, guard, request_body)));
            }
            Err(AttemptError::Body(status)) => {
                // The caller's own request stream failed: its status is the call's.
                return Err(Error::transport(status.clone(), status));
            }
            Err(AttemptError::Unsent(error)) => match unsent_cause(&error) {
                Unsent::Request => {
                    // h2 refused this request, not the connection: fail this call only.
                    tracing::debug!(addr = %ready.addr, conn = ready.id, %error, "request refused before sending");
                    return Err(Error::transport(
                        tonic::Status::internal(format!(
                            "request could not be sent: {}",
                            crate::subchannel::error_chain(&error)
                        )),
                        error,
                    ));
                }
                Unsent::Connection(reason) => {
                    // Nothing left this process; the connection cannot take calls any more:
                    // out of use at once, and its slot opens a new one.
                    ready.request_replacement(reason);
                    (Retry::Unsent, error)
                }
            },
            Err(AttemptError::Stream(error)) => {
                let never = never_processed(&error).or_else(|| {
                    (is_broken_pipe(&error) && ready.fate.broken_streams_unprocessed())
                        .then_some(Retry::NotOpened)
                });
                match never {
                    Some(retry) if replay.can_replay() && retries.allows(retry) => {
                        if retry == Retry::Refused {
                            avoid = Some(ready.id);
                        } else {
                            // Do not wait for the slot to notice the GOAWAY.
                            ready.mark_closing();
                        }
                        (retry, error)
                    }
                    _ => {
                        tracing::debug!(addr = %ready.addr, conn = ready.id, %error, fate = ready.fate.bits(), "call failed on its connection");
                        return Err(transport_error(error));
                    }
                }
            }
        };
        tracing::debug!(addr = %ready.addr, conn = ready.id, ?retry, "transparent retry");
        retries.count(retry, Some(error))?;
    }
}

/// How often a call may be sent again without the caller knowing (gRFC A6).
///
/// - A call the server *refused* (`REFUSED_STREAM`: it reached the server, not its
///   application) goes again once, to another connection when there is one — a server that
///   refuses twice is overloaded, and more attempts would only add to it.
/// - A call that never left this process, or that a connection going away never took (above
///   its GOAWAY's last stream id), goes again on another connection — the one that could not
///   take it is out of use at once, so this is never a loop on one connection — up to
///   [`MAX_UNSENT_RETRIES`] times within the call's deadline. gRFC A6 allows one retry for a
///   GOAWAY'd stream too; but servers recycle their connections in lockstep (the same max
///   age, started together), so a retry often lands on a connection whose GOAWAY is already
///   on the wire, and one retry lost calls under load (1–3 in 13 000 with four connections
///   aged 1 s). No server refused those calls: their connections were closing.
#[derive(Debug, Default)]
struct Retries {
    /// Sends of a call that no connection took.
    untaken: usize,
    /// The one retry after `REFUSED_STREAM` is used.
    refused: bool,
}

impl Retries {
    /// Whether a call that failed for `retry`'s reason may go again.
    fn allows(&self, retry: Retry) -> bool {
        match retry {
            Retry::Refused => !self.refused,
            Retry::Unsent | Retry::GoAway | Retry::NotOpened => self.untaken < MAX_UNSENT_RETRIES,
        }
    }

    /// Counts one more send; fails with `error` when none is allowed.
    fn count(&mut self, retry: Retry, error: Option<h2::Error>) -> Result<(), Error> {
        if !self.allows(retry) {
            return Err(match error {
                Some(err) => transport_error(err),
                None => Error::unavailable("request could not be sent: no connection took it"),
            });
        }
        match retry {
            Retry::Refused => self.refused = true,
            Retry::Unsent | Retry::GoAway | Retry::NotOpened => self.untaken += 1,
        }
        Ok(())
    }
}

/// Why h2 would not open a stream.
#[derive(Debug, PartialEq, Eq)]
enum Unsent {
    /// The request itself cannot be sent (h2's user errors, e.g. malformed headers).
    Request,
    /// The connection cannot open streams any more: it failed, is going away, or has used
    /// up its stream ids (2^31 per connection).
    Connection(String),
}

fn unsent_cause(error: &h2::Error) -> Unsent {
    let user_error =
        !error.is_io() && !error.is_go_away() && !error.is_reset() && error.reason().is_none();
    if !user_error {
        return Unsent::Connection(format!(
            "connection cannot open streams: {}",
            crate::subchannel::error_chain(error)
        ));
    }
    // h2 reports id exhaustion as a user error; it is the connection's, not the request's.
    if error.to_string().contains("stream ID overflowed") {
        Unsent::Connection("stream ids used up: connection replaced".to_owned())
    } else {
        Unsent::Request
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
        let guard = wait_for_connection(shared, wait_for_ready, None)
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
            return Ok(wait_for_connection(shared, wait_for_ready, None)
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

/// Waits until a connection can take the call, per the table in the module docs. A connection
/// with the id `avoid` is only taken when no other is Ready.
async fn wait_for_connection(
    shared: &Shared,
    wait_for_ready: bool,
    avoid: Option<u64>,
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
        let mut pick = picker.pick_reporting(&shared.cursor);
        // Walk on, at most once around the picker, past the connection to avoid.
        for _ in 1..picker.len() {
            match pick {
                Some((conn, _)) if Some(conn.id) == avoid => {
                    pick = picker.pick_reporting(&shared.cursor);
                }
                _ => break,
            }
        }
        if let Some((conn, all_full)) = pick {
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

    /// A refused call goes again once; one no connection took, up to the bound; then the call
    /// fails (no loop).
    #[test]
    fn retries_follow_the_transparent_retry_rules() {
        let mut retries = Retries::default();
        assert!(retries.count(Retry::Refused, None).is_ok());
        assert!(!retries.allows(Retry::Refused));
        assert!(retries.count(Retry::Refused, None).is_err());
        for _ in 0..MAX_UNSENT_RETRIES {
            assert!(retries.allows(Retry::GoAway));
            retries.count(Retry::Unsent, None).unwrap();
        }
        assert!(!retries.allows(Retry::GoAway));
        assert!(retries.count(Retry::NotOpened, None).is_err());
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

/// The call path against a real h2 server over in-memory pipes, through a whole pool.
#[cfg(test)]
mod pool_tests {
    use std::future::poll_fn;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body::Body as _;
    use tower_service::Service;

    use crate::connector::{BoxedIo, Connect, Destination};
    use crate::resolve::BoxFuture;
    use crate::Pool;

    use super::*;

    /// Connections to a real h2 server that answers every call with gRPC status OK; counts the
    /// connections opened and those the client closed gracefully (GOAWAY, then EOF).
    #[derive(Clone, Debug)]
    struct PipeConnector {
        opened: Arc<AtomicUsize>,
        closed_gracefully: Arc<tokio::sync::watch::Sender<usize>>,
    }

    impl Default for PipeConnector {
        fn default() -> Self {
            Self {
                opened: Arc::default(),
                closed_gracefully: Arc::new(tokio::sync::watch::channel(0).0),
            }
        }
    }

    impl Connect for PipeConnector {
        fn connect(&self, _: &Destination) -> BoxFuture<'static, std::io::Result<BoxedIo>> {
            let (client, server) = tokio::io::duplex(64 * 1024);
            self.opened.fetch_add(1, Ordering::SeqCst);
            let graceful = self.closed_gracefully.clone();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(server).await.expect("handshake");
                loop {
                    match conn.accept().await {
                        Some(Ok((_, mut respond))) => {
                            let head = Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let mut stream = respond.send_response(head, false).unwrap();
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            stream.send_trailers(trailers).unwrap();
                        }
                        // The client said GOAWAY and closed: a graceful end.
                        None => {
                            graceful.send_modify(|n| *n += 1);
                            return;
                        }
                        Some(Err(_)) => return,
                    }
                }
            });
            Box::pin(std::future::ready(Ok(Box::new(client) as BoxedIo)))
        }
    }

    fn grpc_request() -> Request<tonic::body::Body> {
        Request::post("/echo.Echo/Unary")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::empty())
            .unwrap()
    }

    async fn call_ok(pool: &mut Pool) {
        let response = tokio::time::timeout(Duration::from_secs(5), pool.call(grpc_request()))
            .await
            .expect("no hang")
            .expect("call ok");
        let mut body = response.into_body();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            frame.expect("body ok");
        }
    }

    async fn wait_for(count: &tokio::sync::watch::Sender<usize>, n: usize) {
        let mut rx = count.subscribe();
        let reached = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|c| *c >= n)).await;
        assert!(reached.is_ok(), "count stuck at {}", *count.borrow());
    }

    /// A connection whose stream ids run out (2^31 per connection) is replaced, not left dead
    /// while the pool says Ready: every call goes through, each used-up connection is closed
    /// with GOAWAY once its calls are done, and close() closes the last one the same way.
    #[tokio::test]
    async fn a_connection_out_of_stream_ids_is_replaced() {
        let connector = PipeConnector::default();
        let mut builder = Pool::builder("static:///127.0.0.1:1").connector(connector.clone());
        // Two stream ids per connection: 2^31 - 3 and 2^31 - 1.
        builder.config.initial_stream_id = Some(0x7fff_fffd);
        let mut pool = builder.build().unwrap();
        pool.wait_ready(Duration::from_secs(5)).await.unwrap();
        for _ in 0..5 {
            call_ok(&mut pool).await;
        }
        assert_eq!(connector.opened.load(Ordering::SeqCst), 3);
        wait_for(&connector.closed_gracefully, 2).await;
        assert_eq!(pool.state(), ConnectivityState::Ready);
        pool.close().await.unwrap();
        // The server reads the GOAWAY and the end of the stream on its own task.
        wait_for(&connector.closed_gracefully, 3).await;
        assert_eq!(connector.opened.load(Ordering::SeqCst), 3);
    }

    /// h2's refusals are told apart: a malformed request fails that call only; used-up stream
    /// ids are the connection's (it must be replaced).
    #[tokio::test]
    async fn unsent_errors_are_classified() {
        let connector = PipeConnector::default();
        let io = connector
            .connect(&Destination {
                addr: "127.0.0.1:1".parse().unwrap(),
                host: "test".into(),
                tls: false,
            })
            .await
            .unwrap();
        let (send, connection) = h2::client::Builder::new()
            .initial_stream_id(0x7fff_ffff)
            .handshake::<_, bytes::Bytes>(io)
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut malformed = Request::post("http://test/echo.Echo/Unary")
            .body(())
            .unwrap();
        malformed
            .headers_mut()
            .insert("connection", "close".parse().unwrap());
        let refused = send.clone().send_request(malformed, true).unwrap_err();
        assert_eq!(unsent_cause(&refused), Unsent::Request);
        let plain = || {
            Request::post("http://test/echo.Echo/Unary")
                .body(())
                .unwrap()
        };
        // Near the end of the id space: within two requests there is no id left.
        let exhausted = (0..2)
            .find_map(|_| send.clone().send_request(plain(), true).err())
            .expect("stream ids ran out");
        assert!(matches!(unsent_cause(&exhausted), Unsent::Connection(_)));
    }
}
