//! Client-side health checking (gRFC A17, feature `health`) against tonic's health service:
//! a connection takes calls only while its server's `Health/Watch` says SERVING.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_pool::{ConnectivityState, Pool, WaitForReady};

use crate::support::common::{builder, client, echo, static_target, wait_endpoint, WAIT};
use crate::support::echo::echo_client::EchoClient;
use crate::support::echo::EchoReply;
use crate::support::server::ServingStatus;
use crate::support::{loopback, ServerOptions, TestServer};

fn health_server(last: u8) -> TestServer {
    TestServer::start_with(
        loopback(last),
        ServerOptions {
            health: true,
            ..ServerOptions::default()
        },
    )
}

/// Which server answered each of `n` unary calls, by server name; every call must succeed.
async fn calls_by_server(client: &mut EchoClient<Pool>, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for i in 0..n {
        let reply = client
            .unary(echo(&format!("call {i}")))
            .await
            .unwrap_or_else(|status| panic!("call {i} failed: {status}"));
        *seen.entry(reply.into_inner().server).or_insert(0) += 1;
    }
    seen
}

/// A bidi call kept open by the test: it is in flight until `end` is called.
struct OpenCall {
    tx: mpsc::Sender<crate::support::echo::EchoRequest>,
    replies: tonic::Streaming<EchoReply>,
}

impl OpenCall {
    async fn start(client: &mut EchoClient<Pool>) -> (Self, String) {
        let (tx, rx) = mpsc::channel(4);
        tx.send(echo("hello")).await.unwrap();
        let mut replies = client
            .bidi(ReceiverStream::new(rx))
            .await
            .expect("bidi call")
            .into_inner();
        let server = replies.next().await.unwrap().unwrap().server;
        (Self { tx, replies }, server)
    }

    /// One more message through the call; returns the server that answered it.
    async fn ping(&mut self, message: &str) -> String {
        self.tx.send(echo(message)).await.unwrap();
        let reply = self.replies.next().await.unwrap().expect("reply");
        assert_eq!(reply.message, message);
        reply.server
    }

    /// Ends the request stream; the call must end with OK.
    async fn end(mut self) {
        drop(self.tx);
        let rest = tokio::time::timeout(WAIT, async {
            let mut rest = Vec::new();
            while let Some(reply) = self.replies.next().await {
                rest.push(reply);
            }
            rest
        })
        .await
        .expect("call ended");
        assert!(rest.iter().all(Result::is_ok), "{rest:?}");
    }
}

/// A server that turns NOT_SERVING gets no new call once the pool has seen the change, while
/// the call already open on it carries on and ends normally; SERVING again brings calls back.
#[tokio::test]
async fn a_not_serving_server_gets_no_new_calls_until_it_serves_again() {
    let a = health_server(2);
    let b = health_server(3);
    let pool = builder(&static_target(&[&a, &b]))
        .health_check("")
        .build()
        .unwrap();
    crate::support::common::wait_all_ready(&pool, 2).await;
    let mut client = client(&pool);

    // One open call on each server (round robin alternates over the two connections).
    let (first, first_server) = OpenCall::start(&mut client).await;
    let (second, second_server) = OpenCall::start(&mut client).await;
    let (mut on_b, on_a) = match (first_server == b.name(), second_server == b.name()) {
        (true, false) => (first, second),
        (false, true) => (second, first),
        _ => panic!("both open calls on one server: {first_server}, {second_server}"),
    };

    b.set_health("", ServingStatus::NotServing).await;
    wait_endpoint(&pool, b.addr(), ConnectivityState::TransientFailure).await;
    assert_eq!(pool.state(), ConnectivityState::Ready);
    let reason = pool.snapshot().endpoint(b.addr()).unwrap().connections[0]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(reason.contains("NOT_SERVING"), "{reason}");

    let before = b.requests();
    let seen = calls_by_server(&mut client, 20).await;
    assert_eq!(seen.get(a.name()), Some(&20), "{seen:?}");
    assert_eq!(
        b.requests(),
        before,
        "a call started on the NOT_SERVING server"
    );
    // The call that was open on it goes on, and ends normally.
    assert_eq!(on_b.ping("still here").await, b.name());
    on_b.end().await;
    on_a.end().await;

    b.set_health("", ServingStatus::Serving).await;
    wait_endpoint(&pool, b.addr(), ConnectivityState::Ready).await;
    let seen = calls_by_server(&mut client, 20).await;
    assert_eq!(seen.get(b.name()), Some(&10), "{seen:?}");
    pool.close().await.unwrap();
}

/// A server without the health service (the Watch fails with UNIMPLEMENTED) is treated as
/// serving: the pool is Ready and calls reach it.
#[tokio::test]
async fn a_server_without_the_health_service_is_used() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server]))
        .health_check("")
        .build()
        .unwrap();
    crate::support::common::wait_all_ready(&pool, 1).await;
    let seen = calls_by_server(&mut client(&pool), 3).await;
    assert_eq!(seen.get(server.name()), Some(&3));
    pool.close().await.unwrap();
}

/// Health checking of one named service: a server that does not know it (SERVICE_UNKNOWN) is
/// not used, one that says it is SERVING is.
#[tokio::test]
async fn a_server_that_does_not_know_the_service_is_not_used() {
    let knows = health_server(2);
    let unknown = health_server(3);
    knows.set_health("echo.Echo", ServingStatus::Serving).await;
    let pool = builder(&static_target(&[&knows, &unknown]))
        .health_check("echo.Echo")
        .build()
        .unwrap();
    wait_endpoint(&pool, knows.addr(), ConnectivityState::Ready).await;
    wait_endpoint(&pool, unknown.addr(), ConnectivityState::TransientFailure).await;
    let reason = pool
        .snapshot()
        .endpoint(unknown.addr())
        .unwrap()
        .connections[0]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(reason.contains("SERVICE_UNKNOWN"), "{reason}");

    let seen = calls_by_server(&mut client(&pool), 10).await;
    assert_eq!(seen.get(knows.name()), Some(&10), "{seen:?}");
    assert_eq!(unknown.requests(), 0);
    pool.close().await.unwrap();
}

/// With no server serving, the pool is in TransientFailure: a call fails fast with UNAVAILABLE
/// saying the server is not serving; a wait-for-ready call waits, and completes once a server
/// says SERVING.
#[tokio::test]
async fn with_no_server_serving_calls_fail_fast_or_wait_for_one() {
    let server = health_server(2);
    server.set_health("", ServingStatus::NotServing).await;
    let pool = builder(&static_target(&[&server]))
        .health_check("")
        .build()
        .unwrap();
    assert!(
        pool.wait_until(WAIT, |s| s.state == ConnectivityState::TransientFailure)
            .await,
        "{:#?}",
        pool.snapshot()
    );
    let mut client = client(&pool);

    let status = client.unary(echo("now")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("NOT_SERVING"), "{status:?}");

    // Wait-for-ready: the call waits instead (here until its deadline)…
    let mut request = tonic::Request::new(echo("waits"));
    request.set_timeout(Duration::from_millis(200));
    request.extensions_mut().insert(WaitForReady(true));
    let status = client.unary(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // …and completes once the server says SERVING.
    let waiting = tokio::spawn({
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(echo("later"));
            request.extensions_mut().insert(WaitForReady(true));
            client.unary(request).await
        }
    });
    server.set_health("", ServingStatus::Serving).await;
    let reply = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting call completed")
        .unwrap()
        .expect("the waiting call succeeded");
    assert_eq!(reply.into_inner().message, "later");
    assert_eq!(server.requests(), 1);
    pool.close().await.unwrap();
}

/// A new connection is not used before its server's first health answer (gRFC A17): the
/// answer SERVING makes it Ready; a server restarted NOT_SERVING gets no call on its new
/// connection.
#[tokio::test]
async fn a_reconnected_server_is_used_only_once_it_says_serving() {
    let a = health_server(2);
    let mut b = health_server(3);
    let pool = builder(&static_target(&[&a, &b]))
        .health_check("")
        .build()
        .unwrap();
    crate::support::common::wait_all_ready(&pool, 2).await;

    b.set_health("", ServingStatus::NotServing).await;
    b.restart();
    // The new connection (the slot's second) is up and its server said NOT_SERVING.
    let reconnected_not_serving = pool
        .wait_until(WAIT, |s| {
            s.endpoint(b.addr()).is_some_and(|e| {
                e.connections.iter().any(|c| {
                    c.connects == 2
                        && c.state == ConnectivityState::TransientFailure
                        && c.last_error
                            .as_ref()
                            .is_some_and(|r| r.contains("NOT_SERVING"))
                })
            })
        })
        .await;
    assert!(reconnected_not_serving, "{:#?}", pool.snapshot());
    let seen = calls_by_server(&mut client(&pool), 10).await;
    assert_eq!(seen.get(a.name()), Some(&10), "{seen:?}");
    assert_eq!(b.requests(), 0);

    b.set_health("", ServingStatus::Serving).await;
    wait_endpoint(&pool, b.addr(), ConnectivityState::Ready).await;
    pool.close().await.unwrap();
}

/// The Watch ends with its connection (gRFC A17 cancels it on GOAWAY): a server's graceful
/// shutdown, which waits for every open stream, is not held up by it, and the pool closes
/// without waiting on it.
#[tokio::test]
async fn the_watch_does_not_hold_a_closing_connection_open() {
    let mut server = health_server(2);
    let pool = builder(&static_target(&[&server]))
        .health_check("")
        .build()
        .unwrap();
    crate::support::common::wait_all_ready(&pool, 1).await;
    // Bounded below the 5 s after which the pool drops a retired connection that does not
    // close by itself (which would end a forgotten Watch too); a Watch that ends with its
    // connection lets the shutdown finish in milliseconds.
    assert!(
        server.graceful_stop(Duration::from_secs(3)).await,
        "the server's graceful shutdown waited on the Watch"
    );
    assert!(server.wait_for_open_connections(0, WAIT).await);
    pool.close().await.unwrap();
}
