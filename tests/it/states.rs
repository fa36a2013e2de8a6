//! Visibility: the pool's states through the watch API and the event stream.

use crate::support;

use std::time::Duration;

use support::common::{builder, client, echo, static_target, WAIT};
use support::{loopback, TestServer};
use tokio::time::Instant;
use tonic_pool::state::Scope;
use tonic_pool::ConnectivityState::*;

/// The next pool-level transition, skipping endpoint and connection events.
async fn next_pool_event(
    events: &mut tonic_pool::StateEvents,
) -> (tonic_pool::ConnectivityState, tonic_pool::ConnectivityState) {
    let deadline = Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("a pool event arrives")
            .expect("no lag");
        if event.scope == Scope::Pool {
            return (event.from, event.to);
        }
    }
}

/// Start-up, loss, recovery and close, as the pool reports them, in order.
#[tokio::test]
async fn state_sequence_through_startup_loss_recovery_and_close() {
    let mut server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server]))
        .connections_per_endpoint(2)
        .connect_lazily(true)
        .build()
        .unwrap();
    let mut events = pool.events();
    let mut watch = pool.watch();
    assert_eq!(pool.state(), Idle);
    // A lazy pool stays Idle until asked.
    assert!(
        !pool
            .wait_for_state_change(Idle, Duration::from_millis(50))
            .await
    );

    pool.connect();
    assert_eq!(next_pool_event(&mut events).await, (Idle, Connecting));
    assert_eq!(next_pool_event(&mut events).await, (Connecting, Ready));
    assert_eq!(watch.changed().await, Ready);

    server.stop();
    assert_eq!(
        next_pool_event(&mut events).await,
        (Ready, TransientFailure)
    );
    assert!(watch.wait_for(TransientFailure, WAIT).await);

    server.restart();
    assert_eq!(
        next_pool_event(&mut events).await,
        (TransientFailure, Ready)
    );
    assert!(pool.wait_for_state_change(TransientFailure, WAIT).await);
    assert_eq!(pool.state(), Ready);

    pool.close().await.unwrap();
    assert_eq!(next_pool_event(&mut events).await, (Ready, Shutdown));
    assert_eq!(watch.changed().await, Shutdown);
}

/// Per-endpoint and per-connection snapshots carry address, state and calls in flight.
#[tokio::test]
async fn snapshot_shows_connections_in_flight() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server]))
        .connections_per_endpoint(3)
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    assert!(pool.wait_until(WAIT, |s| s.ready_connections() == 3).await);
    let mut client = client(&pool);
    let slow =
        tokio::spawn(async move { client.unary(support::common::slow_echo("slow", 300)).await });
    // The server has the call: the pool counted it in flight before sending it.
    assert!(server.wait_for_requests(1, WAIT).await);
    let snapshot = pool.snapshot();
    let endpoint = snapshot.endpoint(server.addr()).unwrap();
    assert_eq!(endpoint.state, Ready);
    assert_eq!(endpoint.connections.len(), 3);
    assert_eq!(
        endpoint
            .connections
            .iter()
            .filter(|c| c.in_flight == 1)
            .count(),
        1
    );
    slow.await.unwrap().unwrap();
    assert_eq!(
        pool.snapshot().in_flight(),
        0,
        "the call ended with its response"
    );
    let mut client = self::client(&pool);
    client.unary(echo("after")).await.unwrap();
    pool.close().await.unwrap();
}

/// A pool whose only address refuses connections goes TransientFailure, and the watch sees it.
#[tokio::test]
async fn unreachable_address_is_transient_failure() {
    let addr = support::common::unused_addr(2);
    let pool = builder(&format!("static:///{addr}")).build().unwrap();
    let mut watch = pool.watch();
    assert!(watch.wait_for(TransientFailure, WAIT).await);
    let err = pool
        .wait_ready(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(err.is_deadline_exceeded());
    assert!(err.to_string().contains("connect error"), "{err}");
    pool.close().await.unwrap();
}

/// `wait_until_summary` returns once the pool's O(1) summary shows every connection Ready,
/// and the summary's counts agree with the snapshot's, then show the closed pool.
#[tokio::test]
async fn the_summary_counts_what_the_snapshot_lists() {
    let (a, b) = (
        TestServer::start(loopback(2)),
        TestServer::start(loopback(3)),
    );
    let pool = builder(&static_target(&[&a, &b]))
        .connections_per_endpoint(3)
        .build()
        .unwrap();
    assert!(
        pool.wait_until_summary(WAIT, |s| s.connections.ready == 6)
            .await
    );
    let (summary, snapshot) = (pool.summary(), pool.snapshot());
    assert_eq!(summary.state, Ready);
    assert_eq!(summary.state, snapshot.state);
    assert_eq!(summary.endpoints.ready, 2);
    assert_eq!(summary.endpoints.total(), snapshot.endpoints.len());
    assert_eq!(summary.connections.total(), 6);
    assert_eq!(snapshot.ready_connections(), 6);
    assert_eq!(
        (summary.draining_endpoints, summary.in_flight),
        (0, snapshot.in_flight())
    );
    pool.close().await.unwrap();
    assert_eq!(pool.summary().state, Shutdown);
    assert_eq!(pool.summary().connections.total(), 0);
}
