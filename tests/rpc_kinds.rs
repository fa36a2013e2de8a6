//! The pool is a drop-in for a Channel: every RPC kind works through a generated client.

mod support;

use support::common::{builder, client, echo, static_target, wait_all_ready};
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
