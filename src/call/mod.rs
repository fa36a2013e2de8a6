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
//! A deadline that passes while waiting, before the response headers or while the response
//! body still streams fails the call with DEADLINE_EXCEEDED.
//!
//! What goes wrong on the wire is classified from h2's error (`retry.rs`): a request h2
//! refuses fails that call alone (INTERNAL); a connection that cannot open streams is taken
//! out of use and replaced, and the call goes to another one; a stream the server refused goes
//! again once; a stream no connection took goes again on another connection, a bounded number
//! of times. Everything else is the call's result.
//!
//! | file | what it owns |
//! |---|---|
//! | `options.rs` | the call's deadline and wait-for-ready, from its request |
//! | `pick.rs` | picking a connection or waiting for one, and for room beside a full one |
//! | `attempt.rs` | one attempt on h2: HEADERS, the body one frame ahead, the response head |
//! | `retry.rs` | when a call may go again (gRFC A6), from h2's errors |
//! | `replay.rs` | the bounded buffer that lets a request body be sent again |
//! | `body.rs` | the response body: in-flight mark, deadline, gRPC status of transport errors |
//!
//! One more wait, for stream limits: a call that lands past the server's
//! `MAX_CONCURRENT_STREAMS` on its connection, while its endpoint is growing, waits here for
//! a call to end or the next connection to be Ready (at most a second) rather than queueing
//! in HTTP/2 behind that one connection's streams — see `make_room`. A call queued inside h2
//! can never move to another connection; a call waiting here still can.

mod attempt;
mod body;
mod options;
mod pick;
mod replay;
mod retry;

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use tokio::time::Instant;

use crate::conn::InFlightGuard;
use crate::error::{error_chain, Error};
use crate::growth::Place as _;
use crate::registry::Shared;
use crate::state::{ConnectivityState, Outcome};

use self::attempt::AttemptError;
use self::body::transport_error;
use self::pick::{make_room, wait_for_connection};
use self::replay::{Cursor, Replay};
use self::retry::{is_broken_pipe, never_processed, unsent_cause, Retries, Retry, Unsent};

pub use self::body::ResponseBody;
pub(crate) use self::options::CallOptions;
pub use self::options::WaitForReady;

/// Runs a call to its response headers.
///
/// Not an `async fn`: an async fn keeps its arguments twice in its future (as arguments and
/// again as locals), and one that hands them on to another async fn keeps them once more
/// inside that one's future — for a whole request and an in-flight guard, over a kilobyte a
/// call. Here the call's state is built before the future, held by it once ([`Call`]), and
/// the attempt loop borrows it.
#[inline(always)]
pub(crate) fn run(
    shared: Arc<Shared>,
    first: Option<InFlightGuard>,
    req: Request<tonic::body::Body>,
    options: CallOptions,
) -> impl Future<Output = Result<Response<ResponseBody>, Error>> + Send + 'static {
    let (parts, body) = req.into_parts();
    let mut call = Call {
        shared,
        first,
        parts,
        replay: Replay::new(body),
        wait_for_ready: options.wait_for_ready,
        deadline: options.deadline,
        on_connection: false,
        // Its start is set when the call starts: its future's first poll.
        #[cfg(feature = "metrics")]
        call_metrics: crate::metrics::CallMetrics {
            method: options.method,
            started: 0,
        },
    };
    async move {
        // The call's start, for its metrics: its first pick's clock read when it picked at
        // once (no clock read of its own). Here rather than before the future, where it
        // would cost two copies of the request and the call (~100 instructions): the
        // compiler then builds them on the stack and moves them, instead of in place.
        #[cfg(feature = "metrics")]
        {
            call.call_metrics.started = call
                .first
                .as_ref()
                .map_or_else(crate::balance::now_ns, InFlightGuard::picked_at);
        }
        let result = match call.deadline {
            None => call.send().await,
            Some(deadline) => match tokio::time::timeout_at(deadline, call.send()).await {
                Ok(result) => result,
                Err(_) => Err(Error::deadline_exceeded(match call.shared.state() {
                    ConnectivityState::Ready => "deadline exceeded".to_owned(),
                    state => {
                        format!("deadline exceeded while waiting for a connection (pool {state})")
                    }
                })),
            },
        };
        if let (Err(error), false) = (&result, call.on_connection) {
            call.shared.call_failed_without_connection();
            #[cfg(feature = "metrics")]
            if let Outcome::Status(code) = outcome_of(error) {
                call.shared.metrics.call_failed_without_connection(
                    call.call_metrics,
                    crate::balance::now_ns(),
                    code,
                );
            }
            #[cfg(not(feature = "metrics"))]
            let _ = error;
        }
        result
    }
}

/// One call's state, held once by its future (see [`run`]).
struct Call {
    shared: Arc<Shared>,
    /// The connection picked when the call was made, if one was Ready.
    first: Option<InFlightGuard>,
    parts: http::request::Parts,
    replay: Replay,
    wait_for_ready: bool,
    deadline: Option<Instant>,
    /// Whether the call's last attempt holds its place on a connection: that attempt counts
    /// the call's end. A place given back while waiting for room was no attempt, and one that
    /// is retried ends no call.
    on_connection: bool,
    /// The call's method and start, for its metrics.
    #[cfg(feature = "metrics")]
    call_metrics: crate::metrics::CallMetrics,
}

/// The outcome an attempt that ends with `error` is counted under.
fn outcome_of(error: &Error) -> Outcome {
    Outcome::Status(error.status().map_or(tonic::Code::Unknown, |s| s.code()))
}

impl Call {
    /// Picks, sends, and goes again where gRPC allows, until the response headers.
    async fn send(&mut self) -> Result<Response<ResponseBody>, Error> {
        let Call {
            shared,
            first,
            parts,
            replay,
            wait_for_ready,
            deadline,
            on_connection,
            #[cfg(feature = "metrics")]
            call_metrics,
        } = self;
        let shared: &Shared = shared;
        let (wait_for_ready, deadline) = (*wait_for_ready, *deadline);
        let mut retries = Retries::default();
        // A connection that refused the call: its retry goes to another one if there is one.
        let mut avoid = None;
        loop {
            let guard = match first.take() {
                Some(guard) => guard,
                None => {
                    #[cfg(feature = "metrics")]
                    let _waiting = shared.metrics.waiting();
                    wait_for_connection(shared, wait_for_ready, avoid)
                        .await?
                        .start_call()
                }
            };
            // Most calls have room: they do not go through `make_room`'s future (which would
            // take the guard in and hand it back out). The few that do wait anyway: theirs is
            // boxed, so that its kilobyte (it holds the guard several times) is not part of
            // every call's future, which is moved into a box and polled on every call.
            let mut guard = if guard.is_beyond_stream_limit() {
                Box::pin(make_room(shared, guard, wait_for_ready)).await?
            } else {
                guard
            };
            *on_connection = true;
            #[cfg(feature = "metrics")]
            guard.metrics.of_call(&shared.metrics, *call_metrics);
            let ready = &guard.conn;
            let Some(sender) = ready.sender() else {
                // The connection retired between the pick and here: nothing was sent.
                let counted = retries.count(Retry::Unsent, None);
                guard.set_outcome(match &counted {
                    Ok(()) => Outcome::Retried(Retry::Unsent),
                    Err(e) => outcome_of(e),
                });
                counted?;
                *on_connection = false;
                continue;
            };
            let mut cursor = Cursor::default();
            let attempted = attempt::attempt(sender, parts, replay, &mut cursor).await;
            #[cfg(feature = "metrics")]
            guard
                .metrics
                .sent(&mut cursor.sent, matches!(&attempted, Ok((_, Some(_)))));
            let (retry, error) = match attempted {
                Ok((response, unfinished)) => {
                    guard.response_arrived();
                    // A trailers-only response has its status in its head.
                    guard.set_status_from_head(response.status(), response.headers());
                    replay.commit(&cursor);
                    // A request still streaming takes the body along (the call sends nothing more).
                    let request_body = unfinished.map(|pipe| {
                        let replay =
                            std::mem::replace(replay, Replay::new(tonic::body::Body::empty()));
                        pipe.unfinished(replay, cursor).spawn(&shared.runtime)
                    });
                    return Ok(
                        response.map(|body| ResponseBody::new(body, guard, request_body, deadline))
                    );
                }
                Err(AttemptError::Body(status)) => {
                    // The caller's own request stream failed: its status is the call's.
                    guard.set_outcome(Outcome::Status(status.code()));
                    return Err(Error::transport(status.clone(), status));
                }
                Err(AttemptError::Unsent(error)) => match unsent_cause(&error) {
                    Unsent::Request => {
                        // h2 refused this request, not the connection: fail this call only.
                        tracing::trace!(addr = %ready.addr, conn = ready.id, %error, "request refused before sending");
                        guard.set_outcome(Outcome::Status(tonic::Code::Internal));
                        return Err(Error::transport(
                            tonic::Status::internal(format!(
                                "request could not be sent: {}",
                                error_chain(&error)
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
                Err(AttemptError::Stream(error, stream_id)) => {
                    let never = never_processed(&error).or_else(|| {
                        (is_broken_pipe(&error) && ready.fate.stream_unprocessed(stream_id))
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
                            tracing::trace!(addr = %ready.addr, conn = ready.id, %error, fate = ready.fate.bits(), "call failed on its connection");
                            let error = transport_error(error);
                            guard.set_outcome(outcome_of(&error));
                            return Err(error);
                        }
                    }
                }
            };
            tracing::trace!(addr = %ready.addr, conn = ready.id, retry = retry.label(), "transparent retry");
            let counted = retries.count(retry, Some(error));
            guard.set_outcome(match &counted {
                Ok(()) => Outcome::Retried(retry),
                Err(e) => outcome_of(e),
            });
            counted?;
            *on_connection = false;
        }
    }
}

/// The call path against a real h2 server over in-memory pipes, through a whole pool.
#[cfg(test)]
mod pool_tests {
    use std::future::poll_fn;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http::HeaderMap;

    use http_body::Body as _;
    use tower_service::Service;

    use crate::call::retry::{unsent_cause, Unsent};
    use crate::connector::{BoxedIo, Connect, Destination};
    use crate::BoxFuture;
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
            .connect(&Destination::new(
                "127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap(),
                "test",
                false,
            ))
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
