//! gRPC client-side health checking (gRFC A17) of one connection: the server's
//! `grpc.health.v1.Health/Watch` stream decides whether the connection takes calls.
//!
//! The Watch runs on the connection itself — a stream of the same HTTP/2 connection its calls
//! use, opened with its [`Connection::sender`] through [`ConnService`], a `tower::Service` that
//! tonic-health's generated `HealthClient` takes. It runs inside the slot's task, beside the
//! wait for the connection's end ([`watch`] never completes; the slot drops it when the
//! connection stops serving, which resets the stream), so there is one Watch per connection and
//! none outlives it.
//!
//! How the server's answers show in the pool's states (A17's subchannel states, as the registry
//! keeps them for the connection):
//!
//! | the Watch says | connection state | picked |
//! |---|---|---|
//! | nothing yet (connected, first answer pending) | Connecting | no |
//! | `SERVING` | Ready | yes |
//! | `NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN` | TransientFailure, the status as its reason | no |
//! | the call fails with `UNIMPLEMENTED` (no health service) | Ready, logged once; not asked again | yes |
//! | the call fails otherwise, or ends | TransientFailure; retried with backoff, Connecting while retried | no |
//!
//! A connection that is not picked stays open: calls in flight on it finish, and a `SERVING`
//! later makes it Ready again at once (TransientFailure → Ready, as A17 allows). The change of
//! state republishes the picker in the same step, and before it the connection's serving flag
//! already turns stale pickers away from it, so a server that goes `NOT_SERVING` gets no new
//! call once its answer has arrived. When every connection is not serving, the pool is in
//! TransientFailure and calls fail fast with UNAVAILABLE naming the status (or wait, with
//! wait-for-ready). A snapshot shows such a connection with no calls in flight, as any
//! connection that is not Ready.
//!
//! The backoff between Watch attempts is the pool's connection backoff; an attempt that
//! received a message resets it, so the next attempt starts at once (A17). The Watch stream
//! takes one of the server's `MAX_CONCURRENT_STREAMS` without counting as a call: with a limit
//! of N, the N-th call on a connection waits in HTTP/2 for a stream to end.

use std::convert::Infallible;
use std::future::{pending, poll_fn, Future};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, Uri};
use http_body::{Body, Frame};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::conn::ready::Connection;
use crate::conn::slot::SlotEvents;
use crate::connector::Destination;
use crate::error::{error_chain, BoxError};
use crate::state::ConnectivityState;

/// What one connection's Watch needs from its slot.
pub(crate) struct HealthWatch<'a> {
    /// The service whose health is asked for ("" for the whole server).
    pub(crate) service: &'a str,
    pub(crate) config: &'a Config,
    pub(crate) dst: &'a Destination,
    pub(crate) ready: &'a Arc<Connection>,
    pub(crate) events: &'a dyn SlotEvents,
    pub(crate) id: u64,
    pub(crate) seed: u64,
}

/// How one Watch call ended.
enum WatchEnd {
    /// The server has no health service: treat the connection as serving.
    Unimplemented,
    /// The call failed or ended; `answered` if it brought at least one message.
    Failed { reason: String, answered: bool },
}

/// Watches the connection's health for as long as it serves, reporting each change of what
/// the server says as the connection's state. Never completes: the slot drops it.
pub(crate) async fn watch(health: HealthWatch<'_>) -> Infallible {
    let HealthWatch {
        service,
        config,
        dst,
        ready,
        events,
        id,
        seed,
    } = health;
    let mut report = Reporter {
        ready,
        events,
        id,
        last: None,
    };
    let mut backoff = Backoff::new(config.backoff.clone(), seed.rotate_left(17));
    let mut client =
        HealthClient::with_origin(ConnService::new(ready.clone()), origin(config, dst));
    loop {
        match watch_once(&mut client, service, &mut report).await {
            WatchEnd::Unimplemented => {
                tracing::info!(addr = %dst.addr, conn = id, service, "server has no health service (Watch UNIMPLEMENTED): health checking off for this connection, treated as serving");
                report.state(
                    ConnectivityState::Ready,
                    "health check: server has no health service (UNIMPLEMENTED), treated as serving",
                );
                return pending().await;
            }
            WatchEnd::Failed { reason, answered } => {
                report.state(
                    ConnectivityState::TransientFailure,
                    &format!("health check failed: {reason}"),
                );
                let delay = if answered {
                    backoff.reset();
                    Duration::ZERO
                } else {
                    backoff.next_delay()
                };
                tracing::debug!(addr = %dst.addr, conn = id, ?delay, %reason, "health Watch failed; retrying");
                tokio::time::sleep(delay).await;
                report.state(ConnectivityState::Connecting, "health check: Watch retried");
            }
        }
    }
}

/// One Watch call, reporting each status it brings.
async fn watch_once(
    client: &mut HealthClient<ConnService>,
    service: &str,
    report: &mut Reporter<'_>,
) -> WatchEnd {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let mut stream = match client.watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::Unimplemented => return WatchEnd::Unimplemented,
        Err(status) => {
            return WatchEnd::Failed {
                reason: describe(&status),
                answered: false,
            }
        }
    };
    let mut answered = false;
    loop {
        match stream.message().await {
            Ok(Some(response)) => {
                answered = true;
                report.status(service, response.status);
            }
            Ok(None) => {
                return WatchEnd::Failed {
                    reason: "the server ended the Watch".to_owned(),
                    answered,
                }
            }
            Err(status) => {
                return WatchEnd::Failed {
                    reason: describe(&status),
                    answered,
                }
            }
        }
    }
}

fn describe(status: &tonic::Status) -> String {
    format!("Watch returned {:?}: {}", status.code(), status.message())
}

/// Turns what the Watch says into the connection's state, reporting only changes.
struct Reporter<'a> {
    ready: &'a Arc<Connection>,
    events: &'a dyn SlotEvents,
    id: u64,
    last: Option<(ConnectivityState, String)>,
}

impl Reporter<'_> {
    fn status(&mut self, service: &str, status: i32) {
        let name = ServingStatus::try_from(status).map_or("an unknown status", |s| s.as_str_name());
        match ServingStatus::try_from(status) {
            Ok(ServingStatus::Serving) => {
                self.state(ConnectivityState::Ready, "health check: SERVING");
            }
            _ => self.state(
                ConnectivityState::TransientFailure,
                &format!("health check: server not serving: {name} for service {service:?}"),
            ),
        }
    }

    fn state(&mut self, state: ConnectivityState, reason: &str) {
        if self
            .last
            .as_ref()
            .is_some_and(|(s, r)| *s == state && r == reason)
        {
            return;
        }
        self.last = Some((state, reason.to_owned()));
        // The flag first: a picker published before the registry's next one skips it already.
        self.ready.set_serving(state == ConnectivityState::Ready);
        let ready = (state == ConnectivityState::Ready).then(|| self.ready.clone());
        self.events.transition(self.id, state, reason, ready);
    }
}

/// The scheme and authority of the Watch: the pool's origin when set, else the connection's
/// own host and port.
fn origin(config: &Config, dst: &Destination) -> Uri {
    if let Some(origin) = &config.origin {
        return origin.clone();
    }
    let scheme = if dst.tls { "https" } else { "http" };
    let authority = if dst.host.parse::<IpAddr>().is_ok() {
        dst.addr.to_string()
    } else {
        format!("{}:{}", dst.host, dst.addr.port())
    };
    Uri::try_from(format!("{scheme}://{authority}"))
        .unwrap_or_else(|_| Uri::from_static("http://localhost"))
}

/// A `tower::Service` that sends a request on one connection's HTTP/2 handle — what tonic's
/// generated client needs to call the connection's server.
#[derive(Clone, Debug)]
pub(crate) struct ConnService {
    conn: Arc<Connection>,
}

impl ConnService {
    pub(crate) fn new(conn: Arc<Connection>) -> Self {
        Self { conn }
    }
}

impl tower_service::Service<Request<tonic::body::Body>> for ConnService {
    type Response = Response<WatchBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        // The handle is taken per call, so that none is held past the connection's retirement.
        let sender = self.conn.sender();
        Box::pin(async move {
            let mut sender = sender.ok_or("the connection has retired")?;
            let (head, mut body) = request.into_parts();
            // The request is one small message: send it whole, with the end of the stream.
            let mut message = BytesMut::new();
            while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                if let Ok(data) = frame.map_err(|s| error_chain(&s))?.into_data() {
                    message.extend_from_slice(&data);
                }
            }
            let (response, mut stream) =
                sender.send_request(Request::from_parts(head, ()), false)?;
            stream.send_data(message.freeze(), true)?;
            let response = response.await.map_err(|e| error_chain(&e))?;
            Ok(response.map(|stream| WatchBody {
                stream,
                data_done: false,
            }))
        })
    }
}

/// The response body of a call made through [`ConnService`]: h2's receive stream, its data
/// handed back to flow control as it is read.
#[derive(Debug)]
pub(crate) struct WatchBody {
    stream: h2::RecvStream,
    data_done: bool,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match this.stream.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        this.stream
            .poll_trailers(cx)
            .map(|trailers| trailers.transpose().map(|t| t.map(Frame::trailers)))
    }
}
