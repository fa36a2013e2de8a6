//! Server lifecycle without failed calls: max connection age (GOAWAY), graceful shutdown,
//! and servers that limit concurrent streams.

use crate::support;

use std::time::Duration;

use support::common::{builder, drive_load, static_target, wait_all_ready, wait_endpoint, WAIT};
use support::{loopback, ServerOptions, TestServer};
use tonic_pool::ConnectivityState;

fn aged(name: &str) -> ServerOptions {
    ServerOptions {
        name: name.into(),
        max_connection_age: Some(Duration::from_secs(1)),
        ..ServerOptions::default()
    }
}

/// Servers with max_connection_age 1 s under steady load for 10 s: connections are recycled
/// many times (GOAWAY each second) and not one call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_loses_no_call() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .try_init();
    let a = TestServer::start_with(loopback(2), aged("a"));
    let b = TestServer::start_with(loopback(3), aged("b"));
    let pool = builder(&static_target(&[&a, &b]))
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 4).await;
    let report = drive_load(
        &pool,
        8,
        1,
        Duration::from_secs(10),
        tokio::time::sleep(Duration::from_secs(10)),
    )
    .await;
    let accepted = a.accepted_connections() + b.accepted_connections();
    println!(
        "max-age: {} calls ok, {} failed, {accepted} connections",
        report.ok,
        report.failed.len()
    );
    assert!(
        report.failed.is_empty(),
        "failed calls: {:?}",
        report.failed
    );
    assert!(report.ok > 100, "load ran: {}", report.ok);
    assert!(
        accepted >= 4 * 5,
        "connections were recycled many times: {accepted}"
    );
    pool.close().await.unwrap();
}

/// Graceful shutdown of one of three servers under load, then a restart on the same address:
/// zero failed calls, and the restarted server gets traffic again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_and_restart_loses_no_call() {
    let mut a = TestServer::start(loopback(2));
    let b = TestServer::start(loopback(3));
    let c = TestServer::start(loopback(4));
    let pool = builder(&static_target(&[&a, &b, &c]))
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 6).await;
    let addr = a.addr();
    let scenario = async {
        assert!(a.wait_for_requests(50, WAIT).await);
        assert!(a.graceful_stop(WAIT).await, "graceful stop finished");
        wait_endpoint(&pool, addr, ConnectivityState::TransientFailure).await;
        let before = a.requests();
        a.restart();
        wait_endpoint(&pool, addr, ConnectivityState::Ready).await;
        assert!(
            a.wait_for_requests(before + 50, WAIT).await,
            "traffic resumed"
        );
    };
    let report = drive_load(&pool, 8, 1, Duration::from_secs(20), scenario).await;
    println!(
        "graceful: {} calls ok, {} failed",
        report.ok,
        report.failed.len()
    );
    assert!(
        report.failed.is_empty(),
        "failed calls: {:?}",
        report.failed
    );
    pool.close().await.unwrap();
}

/// A server that allows 2 concurrent streams per connection: 40 calls at concurrency 8 all
/// succeed (calls queue for a stream or are retried when refused, never failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limit_loses_no_call() {
    let server = TestServer::start_with(
        loopback(2),
        ServerOptions {
            max_concurrent_streams: Some(2),
            ..ServerOptions::default()
        },
    );
    let pool = builder(&static_target(&[&server])).build().unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut client = support::common::client(&pool);
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                client
                    .unary(support::common::slow_echo(&format!("{w}-{i}"), 20))
                    .await
                    .expect("no call fails");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(server.requests(), 40);
    pool.close().await.unwrap();
}
