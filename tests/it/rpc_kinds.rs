//! The pool is a drop-in for a Channel: every RPC kind works through a generated client.

use crate::support;

use support::common::{builder, client, echo, static_target, wait_all_ready, WAIT};
use support::echo::StreamRequest;
use support::{loopback, TestServer};
use tokio_stream::StreamExt;

/// Unary, server streaming, client streaming and bidi streaming through `EchoClient<Pool>`.
#[tokio::test]
async fn all_four_rpc_kinds() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server]))
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;
    let mut client = client(&pool);

    let reply = client.unary(echo("hello")).await.unwrap().into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.payload, b"hello");

    let mut stream = client
        .server_stream(StreamRequest {
            count: 5,
            interval_ms: 0,
            message: "s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(reply) = stream.next().await {
        seqs.push(reply.unwrap().seq);
    }
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);

    let outbound = tokio_stream::iter(vec![echo("a"), echo("b"), echo("c")]);
    let reply = client.client_stream(outbound).await.unwrap().into_inner();
    assert_eq!(reply.seq, 3);
    assert!(
        reply.message.contains('a') && reply.message.contains('c'),
        "{}",
        reply.message
    );

    let outbound = tokio_stream::iter(vec![echo("x"), echo("y")]);
    let mut replies = client.bidi(outbound).await.unwrap().into_inner();
    let mut messages = Vec::new();
    while let Some(reply) = replies.next().await {
        messages.push(reply.unwrap().message);
    }
    assert_eq!(messages, vec!["x", "y"]);

    // Every call finished: nothing is left in flight.
    assert_eq!(pool.snapshot().in_flight(), 0);
    pool.close().await.unwrap();
}

/// A bidirectional call whose response the caller drops while its request stream is still
/// open: the pool stops writing the request (it lets go of the caller's stream) and the call
/// leaves the in-flight count.
#[tokio::test]
async fn dropping_a_bidi_response_stops_its_request_stream() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    wait_all_ready(&pool, 1).await;
    let mut client = client(&pool);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(echo("first")).await.unwrap();
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    assert_eq!(reply.message, "first");
    // The request stream is still open: the response started before it ended.
    assert!(!tx.is_closed());
    assert_eq!(pool.snapshot().in_flight(), 1);

    drop(replies);
    tokio::time::timeout(WAIT, tx.closed())
        .await
        .expect("the pool dropped the request stream");
    assert_eq!(pool.snapshot().in_flight(), 0);
    // The connection is fine for the next call.
    assert_eq!(
        client
            .unary(echo("next"))
            .await
            .unwrap()
            .into_inner()
            .message,
        "next"
    );
    pool.close().await.unwrap();
}

/// A request body that fails (here tonic's encoder refuses a message over the client's
/// limit) fails its call with the body's own status, and nothing is left in flight.
#[tokio::test]
async fn a_failing_request_body_fails_the_call_with_its_status() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    wait_all_ready(&pool, 1).await;

    let mut small = client(&pool).max_encoding_message_size(16);
    let status = small
        .unary(echo("a message longer than sixteen bytes"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    assert_eq!(server.requests(), 0, "nothing reached the server's handler");
    assert_eq!(pool.snapshot().in_flight(), 0);
    assert_eq!(pool.state(), tonic_pool::ConnectivityState::Ready);
    let reply = client(&pool).unary(echo("ok")).await.unwrap().into_inner();
    assert_eq!(reply.message, "ok");
    pool.close().await.unwrap();
}

/// Bodies larger than HTTP/2's flow-control windows and than the 256 KiB replay buffer go
/// through whole: a 1 MiB unary request and reply, and a 3 MiB client stream of 64 KiB
/// messages (the pool waits for send capacity between chunks).
#[tokio::test]
async fn large_bodies_respect_flow_control() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    wait_all_ready(&pool, 1).await;
    let mut client = client(&pool);

    let mut big = echo("big");
    big.payload = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let reply = client.unary(big.clone()).await.unwrap().into_inner();
    assert_eq!(reply.payload, big.payload);

    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 241) as u8).collect();
    let messages: Vec<_> = (0..48)
        .map(|i| support::echo::EchoRequest {
            payload: chunk.clone(),
            sleep_ms: 0,
            message: format!("{i},"),
        })
        .collect();
    let reply = client
        .client_stream(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.seq, 48);
    assert_eq!(reply.payload.len(), 48 * chunk.len());
    assert!(reply
        .payload
        .chunks(chunk.len())
        .all(|c| c == chunk.as_slice()));
    assert_eq!(pool.snapshot().in_flight(), 0);
    pool.close().await.unwrap();
}

/// A server's error status (a trailers-only response) reaches the caller as the server sent
/// it — code, message and metadata — and is not mistaken for a transport failure.
#[tokio::test]
async fn server_error_statuses_pass_through_unchanged() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    wait_all_ready(&pool, 1).await;
    let mut client = client(&pool);
    for code in [
        tonic::Code::InvalidArgument,
        tonic::Code::NotFound,
        tonic::Code::Unavailable,
        tonic::Code::ResourceExhausted,
        tonic::Code::Internal,
    ] {
        let status = client
            .unary(echo(&format!("status:{}", code as i32)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(status.message(), format!("{code:?} as requested"));
        assert_eq!(
            status
                .metadata()
                .get("x-served-by")
                .map(|v| v.to_str().unwrap()),
            Some(server.name())
        );
    }
    // Each error ended its call: nothing in flight, the connection still serves.
    assert_eq!(pool.snapshot().in_flight(), 0);
    assert_eq!(pool.snapshot().endpoints[0].connections[0].connects, 1);
    assert_eq!(
        client.unary(echo("ok")).await.unwrap().into_inner().message,
        "ok"
    );
    pool.close().await.unwrap();
}

/// Metadata that HTTP/2 forbids in a request (connection-specific headers, RFC 9113 §8.2.2)
/// is stripped, as hyper does for a `Channel`: the call succeeds, and the connection it went
/// on keeps serving. (It used to be refused by h2 and taken for a closing connection — one
/// such call left a one-connection pool Ready with no usable connection, and the next
/// ordinary call hung.)
#[tokio::test]
async fn forbidden_connection_headers_are_stripped_and_poison_nothing() {
    let server = TestServer::start(loopback(2));
    for connections in [1, 3] {
        let pool = builder(&static_target(&[&server]))
            .connections_per_endpoint(connections)
            .build()
            .unwrap();
        wait_all_ready(&pool, connections).await;
        let mut client = client(&pool);
        for (name, value) in [
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "named by connection"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
        ] {
            let mut request = tonic::Request::new(echo(name));
            request.metadata_mut().insert(name, value.parse().unwrap());
            request.set_timeout(WAIT);
            let reply = client.unary(request).await;
            assert!(reply.is_ok(), "{name}: {reply:?}");
        }
        // Ordinary calls still go through, on the same connections as before.
        for _ in 0..2 * connections {
            let mut request = tonic::Request::new(echo("plain"));
            request.set_timeout(WAIT);
            client.unary(request).await.unwrap();
        }
        let snapshot = pool.snapshot();
        let connects: u64 = snapshot
            .endpoints
            .iter()
            .flat_map(|e| &e.connections)
            .map(|c| c.connects)
            .sum();
        assert_eq!(connects, connections as u64, "{snapshot:#?}");
        assert_eq!(snapshot.ready_connections(), connections);
        pool.close().await.unwrap();
    }
}

/// A caller's own user agent is kept, with the pool's appended, as tonic does.
#[tokio::test]
async fn a_callers_user_agent_gets_the_pools_appended() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    let mut request = tonic::Request::new(echo("user-agent?"));
    request
        .metadata_mut()
        .insert("user-agent", "my-app/1.0".parse().unwrap());
    request.set_timeout(WAIT);
    let reply = client(&pool).unary(request).await.unwrap().into_inner();
    let ours = concat!("tonic-pool/", env!("CARGO_PKG_VERSION"));
    assert_eq!(reply.message, format!("my-app/1.0 {ours}"));
    pool.close().await.unwrap();
}
