//! Long-lived streams across server restarts, with `ResilientStream`.

use crate::support;

use std::time::Duration;

use support::common::{builder, client, wait_endpoint, WAIT};
use support::echo::{EchoReply, StreamRequest};
use support::{loopback, TestServer};
use tonic_pool::stream::{ResilientStream, StreamEvent};
use tonic_pool::{BackoffConfig, ConnectivityState, WaitForReady};

/// Reads events until `n` messages arrived after the last reconnect, checking that they are
/// exactly the server's sequence 0, 1, 2, … (nothing lost after a reconnect). Returns how
/// many reconnects were seen on the way. Bounded by `WAIT` and 10 000 events.
async fn read_contiguous(stream: &mut ResilientStream<EchoReply>, n: u64) -> u64 {
    let mut reconnects = 0;
    let mut expected: Option<u64> = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    for _ in 0..10_000 {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("stream makes progress")
            .expect("stream does not end")
            .expect("no terminal error");
        match event {
            StreamEvent::Reconnected { cause, .. } => {
                assert_eq!(cause.code(), tonic::Code::Unavailable, "{cause:?}");
                reconnects += 1;
                expected = Some(0);
            }
            StreamEvent::Message(reply) => {
                if let Some(want) = expected {
                    assert_eq!(reply.seq, want, "a message was lost or reordered");
                }
                expected = Some(reply.seq + 1);
                if reconnects > 0 && reply.seq + 1 >= n {
                    return reconnects;
                }
            }
            _ => {}
        }
    }
    panic!("too many events");
}

/// A server stream survives its server being restarted twice: after each restart the
/// consumer gets a reconnect signal and then every message the new stream sends, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_survives_two_restarts() {
    let mut server = TestServer::start(loopback(2));
    let addr = server.addr();
    let pool = builder(&format!("static:///{addr}")).build().unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let grpc = client(&pool);
    let mut stream = ResilientStream::new(move || {
        let mut grpc = grpc.clone();
        async move {
            let mut request = tonic::Request::new(StreamRequest {
                count: 100_000,
                interval_ms: 5,
                message: "tick".into(),
            });
            // Reopen as soon as a connection is Ready, waiting (bounded) while none is.
            request.extensions_mut().insert(WaitForReady(true));
            request.set_timeout(WAIT);
            grpc.server_stream(request).await
        }
    })
    .backoff(support::common::fast_backoff());

    // The first stream flows.
    for _ in 0..5 {
        match stream.next().await.unwrap().unwrap() {
            StreamEvent::Message(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    for round in 1..=2 {
        server.stop();
        wait_endpoint(&pool, addr, ConnectivityState::TransientFailure).await;
        server.restart();
        let seen = read_contiguous(&mut stream, 20).await;
        assert_eq!(seen, 1, "one reconnect in round {round}");
        assert_eq!(stream.reconnects(), round);
    }
    // Dropping the stream cancels it; then nothing is in flight and close() is clean.
    drop(stream);
    pool.close().await.unwrap();
}

/// A status that is not retryable ends the stream with that status, and the first open is
/// not retried (it reports misuse at once).
#[tokio::test]
async fn non_retryable_errors_end_the_stream() {
    let addr = support::common::unused_addr(2);
    let pool = builder(&format!("static:///{addr}")).build().unwrap();
    assert!(
        pool.watch()
            .wait_for(ConnectivityState::TransientFailure, WAIT)
            .await
    );
    let grpc = client(&pool);
    let mut stream = ResilientStream::new(move || {
        let mut grpc = grpc.clone();
        async move {
            grpc.server_stream(StreamRequest {
                count: 1,
                interval_ms: 0,
                message: String::new(),
            })
            .await
        }
    })
    .backoff(BackoffConfig {
        initial: Duration::from_millis(10),
        ..BackoffConfig::default()
    });
    let status = stream.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(stream.next().await.is_none());
    pool.close().await.unwrap();
}
