//! What a call does when nothing is Ready: wait, fail fast, or run out of deadline.

use crate::support;

use std::time::Duration;

use support::common::{builder, client, echo, unused_addr, WAIT};
use support::{ServerOptions, TestServer};
use tonic::Code;
use tonic_pool::{ConnectivityState, WaitForReady};

fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

fn wait_for_ready<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    request.extensions_mut().insert(WaitForReady(true));
    request
}

/// Every server down: a plain call fails fast with UNAVAILABLE naming the last error; a
/// wait-for-ready call with a deadline fails with DEADLINE_EXCEEDED, not CANCELLED.
#[tokio::test]
async fn fail_fast_and_deadline_with_every_server_down() {
    let addr = unused_addr(2);
    let pool = builder(&format!("static:///{addr}")).build().unwrap();
    assert!(
        pool.watch()
            .wait_for(ConnectivityState::TransientFailure, WAIT)
            .await
    );
    let mut client = client(&pool);

    let started = tokio::time::Instant::now();
    let status = client.unary(echo("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("connect error"), "{status:?}");
    assert!(started.elapsed() < WAIT, "failed fast");

    let request = wait_for_ready(with_timeout(echo("x"), Duration::from_millis(200)));
    let status = client.unary(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // The pool-wide default does the same without the extension.
    let waiting = builder(&format!("static:///{addr}"))
        .wait_for_ready(true)
        .build()
        .unwrap();
    let status = self::client(&waiting)
        .unary(with_timeout(echo("x"), Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // ...and a call can opt out of the default.
    assert!(
        waiting
            .watch()
            .wait_for(ConnectivityState::TransientFailure, WAIT)
            .await
    );
    let status = self::client(&waiting)
        .unary(tonic::Request::new(echo("x")).tap_opt_out())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    pool.close().await.unwrap();
    waiting.close().await.unwrap();
}

trait OptOut {
    fn tap_opt_out(self) -> Self;
}

impl<T> OptOut for tonic::Request<T> {
    fn tap_opt_out(mut self) -> Self {
        self.extensions_mut().insert(WaitForReady(false));
        self
    }
}

/// A wait-for-ready call made while the only server is down completes once it comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ready_call_completes_when_the_server_comes_up() {
    let addr = unused_addr(2);
    let pool = builder(&format!("static:///{addr}")).build().unwrap();
    assert!(
        pool.watch()
            .wait_for(ConnectivityState::TransientFailure, WAIT)
            .await
    );
    let mut client = client(&pool);
    let call = tokio::spawn(async move {
        client
            .unary(wait_for_ready(with_timeout(echo("late"), WAIT)))
            .await
    });
    let server = TestServer::start_with(addr, ServerOptions::default());
    let reply = call.await.unwrap().expect("call waited for the server");
    assert_eq!(reply.into_inner().message, "late");
    assert_eq!(server.requests(), 1);
    pool.close().await.unwrap();
}

/// A call made while the pool is still connecting waits instead of failing.
#[tokio::test]
async fn calls_wait_while_connecting() {
    let server = TestServer::start(support::loopback(2));
    let pool = builder(&format!("static:///{}", server.addr()))
        .connect_lazily(true)
        .build()
        .unwrap();
    assert_eq!(pool.state(), ConnectivityState::Idle);
    // The first call leaves Idle and waits for the connection.
    let reply = client(&pool).unary(echo("first")).await.unwrap();
    assert_eq!(reply.into_inner().message, "first");
    assert_eq!(pool.state(), ConnectivityState::Ready);
    pool.close().await.unwrap();
}

/// The pool's own timeout bounds calls too, as DEADLINE_EXCEEDED.
#[tokio::test]
async fn pool_timeout_is_a_deadline() {
    let server = TestServer::start(support::loopback(2));
    let pool = builder(&format!("static:///{}", server.addr()))
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let status = client(&pool)
        .unary(support::common::slow_echo("slow", 2_000))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    pool.close().await.unwrap();
}
