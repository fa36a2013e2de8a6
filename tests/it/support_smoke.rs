//! Smoke tests for `tests/support`: the echo server, its counters, stop and restart.

use crate::support;

use std::time::Duration;

use support::echo::echo_client::EchoClient;
use support::echo::{EchoRequest, StreamRequest};
use support::{loopback, ServerOptions, TestServer};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// Upper bound for every wait in these tests.
const WAIT: Duration = Duration::from_secs(5);

fn request(message: &str) -> EchoRequest {
    EchoRequest {
        payload: message.as_bytes().to_vec(),
        sleep_ms: 0,
        message: message.to_owned(),
    }
}

async fn connect(server: &TestServer) -> Channel {
    Endpoint::from_shared(server.uri())
        .expect("valid uri")
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("connect to test server")
}

#[tokio::test]
async fn all_four_rpc_kinds_and_counters() {
    let server = TestServer::start(loopback(2));
    assert_eq!(server.addr().ip().to_string(), "127.0.0.2");
    assert_ne!(server.addr().port(), 0);
    assert_eq!(server.name(), server.addr().to_string());

    let channel = connect(&server).await;
    let mut client = EchoClient::new(channel);

    // Unary.
    let reply = client.unary(request("hello")).await.unwrap().into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.payload, b"hello");
    assert_eq!(reply.server, server.name());

    // Server streaming.
    let mut stream = client
        .server_stream(StreamRequest {
            count: 3,
            interval_ms: 1,
            message: "tick".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        assert_eq!(reply.message, "tick");
        seqs.push(reply.seq);
    }
    assert_eq!(seqs, [0, 1, 2]);

    // Client streaming.
    let outbound = tokio_stream::iter(vec![request("a"), request("b"), request("c")]);
    let reply = client.client_stream(outbound).await.unwrap().into_inner();
    assert_eq!(reply.message, "abc");
    assert_eq!(reply.payload, b"abc");
    assert_eq!(reply.seq, 3);

    // Bidi: send one, read one, so it really is interleaved.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut inbound = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for (i, word) in ["x", "y"].into_iter().enumerate() {
        tx.send(request(word)).await.unwrap();
        let reply = inbound.message().await.unwrap().expect("a reply");
        assert_eq!(reply.message, word);
        assert_eq!(reply.seq, i as u64);
    }
    drop(tx);
    assert!(inbound.message().await.unwrap().is_none());

    // Counters: one connection carried all four RPCs.
    assert!(server.wait_for_requests(4, WAIT).await);
    assert_eq!(server.requests(), 4);
    assert_eq!(server.accepted_connections(), 1);
    assert_eq!(server.open_connections(), 1);
    let by_peer = server.requests_by_peer();
    assert_eq!(by_peer.len(), 1, "{by_peer:?}");
    assert_eq!(by_peer.values().sum::<u64>(), 4);
}

#[tokio::test]
async fn requests_by_peer_tells_connections_apart() {
    let server = TestServer::start_with(
        loopback(3),
        ServerOptions {
            name: "three".into(),
            ..ServerOptions::default()
        },
    );
    let mut a = EchoClient::new(connect(&server).await);
    let mut b = EchoClient::new(connect(&server).await);
    for _ in 0..3 {
        a.unary(request("a")).await.unwrap();
    }
    let reply = b.unary(request("b")).await.unwrap().into_inner();
    assert_eq!(reply.server, "three");

    assert!(server.wait_for_accepted(2, WAIT).await);
    let mut counts: Vec<u64> = server.requests_by_peer().into_values().collect();
    counts.sort_unstable();
    assert_eq!(counts, [1, 3]);
}

#[tokio::test]
async fn stop_breaks_calls_and_restart_serves_on_the_same_address() {
    let mut server = TestServer::start(loopback(4));
    let addr = server.addr();
    let channel = connect(&server).await;
    let mut client = EchoClient::new(channel.clone());
    client.unary(request("before")).await.unwrap();

    // An in-flight call is broken by a hard stop.
    let mut slow = EchoClient::new(channel.clone());
    let in_flight = tokio::spawn(async move {
        let mut req = request("slow");
        req.sleep_ms = 10_000;
        slow.unary(req).await
    });
    assert!(server.wait_for_requests(2, WAIT).await);
    server.stop();
    assert!(!server.is_running());
    assert_eq!(server.open_connections(), 0);
    let status = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("in-flight call ends promptly")
        .unwrap()
        .expect_err("in-flight call fails");
    // tonic reports a connection reset mid-call as Unknown ("transport error").
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "{status:?}"
    );

    // While stopped, calls fail.
    assert!(client.unary(request("down")).await.is_err());

    // Same address again, counters carried on; the channel reconnects.
    server.restart();
    assert_eq!(server.addr(), addr);
    // tonic's Channel reconnects on the next call (it has no backoff).
    let reply = tokio::time::timeout(WAIT, client.unary(request("after")))
        .await
        .expect("bounded")
        .expect("a call succeeds after restart")
        .into_inner();
    assert_eq!(reply.message, "after");
    assert_eq!(reply.server, addr.to_string());
    assert!(server.wait_for_accepted(2, WAIT).await);
    assert_eq!(server.accepted_connections(), 2);
    assert_eq!(server.requests(), 3);
}

#[tokio::test]
async fn graceful_stop_lets_in_flight_calls_finish() {
    let mut server = TestServer::start(loopback(5));
    let mut client = EchoClient::new(connect(&server).await);
    let in_flight = tokio::spawn(async move {
        let mut req = request("slow");
        req.sleep_ms = 200;
        client.unary(req).await
    });
    assert!(server.wait_for_requests(1, WAIT).await);
    assert!(server.graceful_stop(WAIT).await);
    let reply = in_flight.await.unwrap().expect("in-flight call completes");
    assert_eq!(reply.into_inner().message, "slow");
    assert!(server.wait_for_open_connections(0, WAIT).await);
}

#[tokio::test]
async fn wait_for_times_out_without_events() {
    let server = TestServer::start(loopback(6));
    assert!(!server.wait_for_requests(1, Duration::from_millis(50)).await);
    assert!(!server.wait_for_accepted(1, Duration::from_millis(50)).await);
    assert!(server.wait_for_open_connections(0, WAIT).await);
}
