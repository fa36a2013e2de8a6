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
use crate::conn::events::SlotEvents;
use crate::conn::ready::Connection;
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
        match ServingStatus::try_from(status) {
            Ok(ServingStatus::Serving) => {
                self.state(ConnectivityState::Ready, "health check: SERVING");
            }
            other => {
                let name = other.map_or("an unknown status", |s| s.as_str_name());
                self.state(
                    ConnectivityState::TransientFailure,
                    &format!("health check: server not serving: {name} for service {service:?}"),
                );
            }
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
    let authority = match dst.addr.socket_addr() {
        Some(tcp) if dst.host.parse::<IpAddr>().is_ok() => tcp.to_string(),
        Some(tcp) => format!("{}:{}", dst.host, tcp.port()),
        // A Unix socket has no port: the host alone (`localhost`, as gRPC sends).
        None => dst.host.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use prost::Message;
    use tokio::time::Instant;

    use crate::balance::Pickable;
    use crate::conn::frames::FrameWatch;
    use crate::conn::ready::{ConnStats, InFlight};

    /// What the test server answers to one Watch call.
    #[derive(Clone, Debug)]
    enum Answer {
        /// A trailers-only response with this gRPC status code.
        Fail(i32),
        /// These statuses, one message each; then the stream stays open, or ends with OK.
        Statuses(Vec<ServingStatus>, bool),
    }

    /// The transitions the Watch reported, with the (paused) time of each.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<(Instant, ConnectivityState, String)>>);

    impl SlotEvents for Recorded {
        fn transition(
            &self,
            _: u64,
            to: ConnectivityState,
            reason: &str,
            _: Option<Arc<Connection>>,
        ) {
            let mut seen = self.0.lock().unwrap();
            seen.push((Instant::now(), to, reason.to_owned()));
        }
        fn removed(&self, _: u64) {}
        fn reresolve(&self) {}
    }

    impl Recorded {
        fn states(&self) -> Vec<ConnectivityState> {
            self.0.lock().unwrap().iter().map(|(_, s, _)| *s).collect()
        }

        /// Waits (paused time: instantly) until `n` transitions were reported.
        async fn wait_for(&self, n: usize) {
            for _ in 0..10_000 {
                if self.0.lock().unwrap().len() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("fewer than {n} transitions: {:?}", self.states());
        }
    }

    /// A health server over an in-memory pipe answering the k-th Watch with `answers[k]`;
    /// returns the pool's connection to it, the Watch (running) and the count of Watch calls.
    async fn watch_against(
        answers: Vec<Answer>,
    ) -> (Arc<Connection>, Arc<Recorded>, Arc<AtomicUsize>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let calls = Arc::new(AtomicUsize::new(0));
        let server_calls = calls.clone();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let mut open = Vec::new();
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                assert_eq!(request.uri().path(), "/grpc.health.v1.Health/Watch");
                let k = server_calls.fetch_add(1, Ordering::SeqCst);
                let head = |status: Option<i32>| {
                    let mut response =
                        http::Response::builder().header("content-type", "application/grpc");
                    if let Some(code) = status {
                        response = response.header("grpc-status", code.to_string());
                    }
                    response.body(()).unwrap()
                };
                match answers.get(k).cloned() {
                    Some(Answer::Fail(code)) => {
                        respond.send_response(head(Some(code)), true).unwrap();
                    }
                    Some(Answer::Statuses(statuses, end)) => {
                        let mut stream = respond.send_response(head(None), false).unwrap();
                        for status in statuses {
                            let message = tonic_health::pb::HealthCheckResponse {
                                status: status as i32,
                            }
                            .encode_to_vec();
                            let mut frame = vec![0u8];
                            frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
                            frame.extend_from_slice(&message);
                            stream.send_data(Bytes::from(frame), false).unwrap();
                        }
                        if end {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            stream.send_trailers(trailers).unwrap();
                        } else {
                            open.push(stream);
                        }
                    }
                    None => open.push(respond.send_response(head(None), false).unwrap()),
                }
            }
        });
        let boxed: crate::connector::BoxedIo = Box::new(client_io);
        let (io, watched) = FrameWatch::new(boxed, None);
        let (send, connection) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let stats = Arc::new(ConnStats::new(
            Arc::new(InFlight::default()),
            Arc::new(crate::growth::Room::default()),
        ));
        let dst = Destination::new(
            "127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap(),
            "127.0.0.1",
            false,
        );
        let ready = Arc::new(Connection::new(
            0,
            dst.addr.clone(),
            send,
            stats,
            watched.fate,
            watched.limits,
        ));
        let events = Arc::new(Recorded::default());
        tokio::spawn({
            let (ready, events) = (ready.clone(), events.clone());
            async move {
                let config = Config::default();
                watch(HealthWatch {
                    service: "",
                    config: &config,
                    dst: &dst,
                    ready: &ready,
                    events: &*events,
                    id: 0,
                    seed: 7,
                })
                .await
            }
        });
        (ready, events, calls)
    }

    use ConnectivityState::{Connecting, Ready, TransientFailure};

    /// A failed Watch makes the connection TransientFailure and is retried after the
    /// connection backoff (1 s ± 20 % by default); the retry is Connecting, SERVING makes the
    /// connection Ready and pickable, NOT_SERVING on the same stream takes it out again.
    #[tokio::test(start_paused = true)]
    async fn a_failed_watch_is_retried_after_backoff() {
        let (ready, events, calls) = watch_against(vec![
            Answer::Fail(tonic::Code::Unavailable as i32),
            Answer::Statuses(
                vec![ServingStatus::Serving, ServingStatus::NotServing],
                false,
            ),
        ])
        .await;
        events.wait_for(4).await;
        let seen = events.0.lock().unwrap().clone();
        let states: Vec<_> = seen.iter().map(|(_, s, _)| *s).collect();
        assert_eq!(
            states,
            [TransientFailure, Connecting, Ready, TransientFailure]
        );
        assert!(seen[0].2.contains("Unavailable"), "{}", seen[0].2);
        let backoff = seen[1].0 - seen[0].0;
        assert!(
            (Duration::from_millis(800)..=Duration::from_millis(1200)).contains(&backoff),
            "{backoff:?}"
        );
        assert!(seen[3].2.contains("NOT_SERVING"), "{}", seen[3].2);
        assert!(
            !ready.is_available(),
            "a NOT_SERVING connection is not picked"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// A Watch that brought a message and then ended is retried at once (the backoff is
    /// reset), and SERVING on the new stream makes the connection pickable again.
    #[tokio::test(start_paused = true)]
    async fn a_watch_that_answered_is_retried_at_once() {
        let (ready, events, _) = watch_against(vec![
            Answer::Statuses(vec![ServingStatus::Serving], true),
            Answer::Statuses(vec![ServingStatus::Serving], false),
        ])
        .await;
        events.wait_for(4).await;
        let seen = events.0.lock().unwrap().clone();
        let states: Vec<_> = seen.iter().map(|(_, s, _)| *s).collect();
        assert_eq!(states, [Ready, TransientFailure, Connecting, Ready]);
        assert_eq!(seen[2].0, seen[1].0, "no backoff after an answered Watch");
        assert!(ready.is_available());
    }

    /// UNIMPLEMENTED (no health service) makes the connection Ready, and the Watch is not
    /// asked again.
    #[tokio::test(start_paused = true)]
    async fn unimplemented_means_serving_for_good() {
        let (ready, events, calls) =
            watch_against(vec![Answer::Fail(tonic::Code::Unimplemented as i32)]).await;
        events.wait_for(1).await;
        tokio::time::sleep(Duration::from_secs(300)).await;
        let seen = events.0.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].1, Ready);
        assert!(seen[0].2.contains("UNIMPLEMENTED"), "{}", seen[0].2);
        assert!(ready.is_available());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
