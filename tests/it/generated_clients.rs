//! Generated clients over the pool, with each of their constructors and settings
//! (`with_interceptor`, `with_origin`, gzip both ways, `max_decoding_message_size`), and the
//! tower layers users put around a `Channel` put around the pool instead (timeout,
//! concurrency limit, rate limit, retry with a budget). Every test talks to a real tonic
//! server on 127.0.0.x.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use support::common::{builder, echo, slow_echo, static_target, wait_all_ready};
use support::echo::echo_client::EchoClient;
use support::echo::{EchoReply, EchoRequest};
use support::{loopback, TestServer};
use tonic::codec::CompressionEncoding;
use tonic::{Code, Status};
use tonic_pool::Pool;
use tower::retry::budget::{Budget, TpsBudget};
use tower::ServiceBuilder;

/// A server on `127.0.0.last` and a Ready pool of one connection to it.
async fn server_and_pool(last: u8) -> (TestServer, Pool) {
    let server = TestServer::start(loopback(last));
    let pool = builder(&static_target(&[&server]))
        .build()
        .expect("valid pool");
    wait_all_ready(&pool, 1).await;
    (server, pool)
}

/// What the server put in the reply's message for `message` (one of its `…?` questions).
async fn ask<T>(client: &mut EchoClient<T>, message: &str) -> String
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    client
        .unary(echo(message))
        .await
        .unwrap_or_else(|s| panic!("{message}: {s:?}"))
        .into_inner()
        .message
}

/// `EchoClient::with_interceptor(pool, f)` compiles (it needs `ResponseBody: Default`), the
/// interceptor's metadata reaches the server, and a call the interceptor rejects fails with
/// its status without reaching the server.
#[tokio::test]
async fn with_interceptor_adds_metadata_and_can_reject() {
    let (server, pool) = server_and_pool(70).await;
    let mut client = EchoClient::with_interceptor(pool.clone(), |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", "Bearer test-token".parse().expect("ascii"));
        Ok(req)
    });
    assert_eq!(
        ask(&mut client, "header?authorization").await,
        "Bearer test-token"
    );

    let before = server.requests();
    let mut rejecting = EchoClient::with_interceptor(pool.clone(), |_: tonic::Request<()>| {
        Err(Status::unauthenticated("no token"))
    });
    let status = rejecting.unary(echo("x")).await.expect_err("rejected");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "no token");
    assert_eq!(server.requests(), before, "a rejected call never leaves");
    pool.close().await.expect("clean close");
}

/// `EchoClient::with_origin(pool, origin)` compiles and works. As with a tonic `Channel`
/// (whose `AddOrigin` overwrites it), the origin's scheme and authority do not reach the
/// server: the pool sets the `:authority` (the target's, or `PoolBuilder::origin`'s).
#[tokio::test]
async fn with_origin_keeps_the_pools_authority() {
    let (server, pool) = server_and_pool(71).await;
    let origin: http::Uri = "http://elsewhere.test:1".parse().expect("uri");
    let mut client = EchoClient::with_origin(pool.clone(), origin);
    assert_eq!(
        ask(&mut client, "authority?").await,
        server.addr().to_string()
    );

    // The pool's own setting is the one that changes it.
    let routed = builder(&static_target(&[&server]))
        .origin("http://vhost.test:8443".parse().expect("uri"))
        .build()
        .expect("valid pool");
    let mut client = EchoClient::new(routed.clone());
    assert_eq!(ask(&mut client, "authority?").await, "vhost.test:8443");
    routed.close().await.expect("clean close");
    pool.close().await.expect("clean close");
}

/// `send_compressed(Gzip)` sends gzip requests (the server sees `grpc-encoding: gzip`) and
/// `accept_compressed(Gzip)` takes gzip responses (the response says `grpc-encoding: gzip`),
/// and the payload survives both ways.
#[tokio::test]
async fn gzip_both_ways() {
    let (_server, pool) = server_and_pool(72).await;
    let mut client = EchoClient::new(pool.clone())
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let payload = vec![7u8; 64 * 1024];
    let request = EchoRequest {
        payload: payload.clone(),
        sleep_ms: 0,
        message: "header?grpc-encoding".to_owned(),
    };
    let response = client.unary(request).await.expect("gzip call");
    assert_eq!(
        response
            .metadata()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip"),
        "the response was compressed"
    );
    let reply = response.into_inner();
    assert_eq!(reply.message, "gzip", "the server saw a gzip request");
    assert_eq!(reply.payload, payload);
    pool.close().await.expect("clean close");
}

/// `max_decoding_message_size` bounds responses through the pool as through a `Channel`: a
/// response over the limit fails with OUT_OF_RANGE (tonic's code for it), one under it works.
#[tokio::test]
async fn max_decoding_message_size_rejects_a_large_response() {
    let (_server, pool) = server_and_pool(73).await;
    let mut client = EchoClient::new(pool.clone()).max_decoding_message_size(1024);
    let small = EchoRequest {
        payload: vec![1; 100],
        ..echo("small")
    };
    client.unary(small).await.expect("under the limit");
    let large = EchoRequest {
        payload: vec![1; 4096],
        ..echo("large")
    };
    let status = client.unary(large).await.expect_err("over the limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // The connection is fine afterwards.
    client.unary(echo("after")).await.expect("next call");
    pool.close().await.expect("clean close");
}

/// `ServiceBuilder::new().timeout(d)` around the pool ends a call that takes longer with
/// tower's `Elapsed` (tonic reports it as UNKNOWN, with `Elapsed` in its source), and lets a
/// quick call through. (The pool's own `PoolBuilder::timeout` and a call's `grpc-timeout`
/// give DEADLINE_EXCEEDED instead.)
#[tokio::test]
async fn tower_timeout_around_the_pool() {
    let (_server, pool) = server_and_pool(74).await;
    let timed = ServiceBuilder::new()
        .timeout(Duration::from_millis(200))
        .service(pool.clone());
    let mut client = EchoClient::new(timed);
    client.unary(echo("quick")).await.expect("quick call");
    // The server would answer after 10 s; the layer gives up long before.
    let status = client
        .unary(slow_echo("slow", 10_000))
        .await
        .expect_err("timed out");
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    let elapsed = std::error::Error::source(&status)
        .is_some_and(|e| e.is::<tower::timeout::error::Elapsed>());
    assert!(elapsed, "tower's Elapsed is the source: {status:?}");
    pool.close().await.expect("clean close");
}

/// `ServiceBuilder::new().concurrency_limit(2)` around the pool, shared by clones of one
/// client: of 8 concurrent calls, the server never runs more than 2 at once, and all succeed.
#[tokio::test]
async fn tower_concurrency_limit_around_the_pool() {
    let (server, pool) = server_and_pool(75).await;
    let limited = ServiceBuilder::new()
        .concurrency_limit(2)
        .service(pool.clone());
    let client = EchoClient::new(limited);
    let mut calls = Vec::new();
    for i in 0..8 {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            client.unary(slow_echo(&format!("call {i}"), 50)).await
        }));
    }
    for call in calls {
        call.await.expect("task").expect("call");
    }
    assert_eq!(server.requests(), 8);
    let max = server.max_concurrent_unary();
    assert!(
        (1..=2).contains(&max),
        "at most 2 calls ran at once, saw {max}"
    );
    pool.close().await.expect("clean close");
}

/// `ServiceBuilder::new().rate_limit(2, 60 s)` around the pool lets 2 calls through, and holds
/// the third (it does not reach the server while the period lasts).
#[tokio::test]
async fn tower_rate_limit_around_the_pool() {
    let (server, pool) = server_and_pool(76).await;
    let limited = ServiceBuilder::new()
        .rate_limit(2, Duration::from_secs(60))
        .service(pool.clone());
    let mut client = EchoClient::new(limited);
    client.unary(echo("1")).await.expect("first");
    client.unary(echo("2")).await.expect("second");
    // The period is a minute: the third call cannot be let through within this wait.
    let third = tokio::time::timeout(Duration::from_millis(200), client.unary(echo("3"))).await;
    assert!(third.is_err(), "the third call waits for the next period");
    assert_eq!(
        server.requests(),
        2,
        "the held call never reached the server"
    );
    pool.close().await.expect("clean close");
}

/// Retries UNAVAILABLE (and nothing else) while the budget allows: for idempotent calls only.
///
/// `tower::retry::Retry` must clone each request before sending it, and an
/// `http::Request<tonic::body::Body>` cannot be cloned (its body is a stream). So the retry
/// goes one level up, around a `tower::service_fn` that makes the call with a generated
/// client: there the request is the message, which is `Clone`.
#[derive(Clone, Debug)]
struct RetryUnavailable {
    budget: Arc<TpsBudget>,
}

impl tower::retry::Policy<EchoRequest, tonic::Response<EchoReply>, Status> for RetryUnavailable {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _request: &mut EchoRequest,
        result: &mut Result<tonic::Response<EchoReply>, Status>,
    ) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                // Successes earn retries (the budget's percentage of them).
                self.budget.deposit();
                None
            }
            Err(status) if status.code() == Code::Unavailable && self.budget.withdraw() => {
                Some(std::future::ready(()))
            }
            Err(_) => None,
        }
    }

    fn clone_request(&mut self, request: &EchoRequest) -> Option<EchoRequest> {
        Some(request.clone())
    }
}

/// The unary method of a generated client over `pool`, as a cloneable tower service of the
/// request message, wrapped in a retry with `policy`.
fn retrying_unary(
    pool: &Pool,
    policy: RetryUnavailable,
) -> impl tower::Service<EchoRequest, Response = tonic::Response<EchoReply>, Error = Status> + Clone
{
    let client = EchoClient::new(pool.clone());
    let unary = tower::service_fn(move |request: EchoRequest| {
        let mut client = client.clone();
        async move { client.unary(request).await }
    });
    ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(policy))
        .service(unary)
}

/// A retry with `tower::retry::budget::TpsBudget` around the pool: a call that fails once with
/// UNAVAILABLE succeeds on its retry (the server saw it twice), a call that fails with another
/// code is not retried, and a call that always fails with UNAVAILABLE is retried only as long
/// as the budget lasts — here exactly as many times as calls succeeded before it (a budget of
/// 100 % of successes, no reserve), then fails with UNAVAILABLE.
#[tokio::test]
async fn tower_retry_with_a_budget_around_the_pool() {
    use tower::{Service, ServiceExt};
    let (server, pool) = server_and_pool(77).await;
    // No reserve; each success earns one retry, each retry costs one; a minute's memory.
    let budget = Arc::new(TpsBudget::new(Duration::from_secs(60), 0, 1.0));
    let mut unary = retrying_unary(&pool, RetryUnavailable { budget });

    for i in 0..3 {
        let ok = unary
            .ready()
            .await
            .expect("ready")
            .call(echo(&format!("{i}")));
        ok.await.expect("plain call");
    }
    assert_eq!(server.requests(), 3);

    // One retry, paid from the three successes (two left, plus one for this success).
    let reply = unary
        .ready()
        .await
        .expect("ready")
        .call(echo("unavailable-once:a"))
        .await
        .expect("succeeds on its retry");
    assert_eq!(reply.into_inner().message, "unavailable-once:a");
    assert_eq!(server.requests(), 5, "sent twice");

    // INVALID_ARGUMENT is not retried.
    let status = unary
        .ready()
        .await
        .expect("ready")
        .call(echo("status:3"))
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(server.requests(), 6, "sent once");

    // Always UNAVAILABLE: retried with the 3 retries left in the budget, then given up.
    let status = unary
        .ready()
        .await
        .expect("ready")
        .call(echo("status:14"))
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(server.requests(), 6 + 1 + 3, "the first try and 3 retries");
    pool.close().await.expect("clean close");
}
