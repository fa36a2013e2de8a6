//! Recovery: a dead server's connections leave the picker at once, are replaced in the
//! background with backoff, and come back when the server does.

use crate::support;

use support::common::{builder, client, echo, static_target, wait_all_ready, wait_endpoint, WAIT};
use support::{loopback, TestServer};
use tonic_pool::ConnectivityState;

/// A server stopped: its connections reach TransientFailure, no call fails after that state
/// is observed and none goes there; restarted on the same address: Ready again, and traffic
/// resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_around_a_stopped_server_and_back() {
    let mut a = TestServer::start(loopback(2));
    let b = TestServer::start(loopback(3));
    let pool = builder(&static_target(&[&a, &b]))
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 4).await;
    let mut client = client(&pool);
    for i in 0..20 {
        client.unary(echo(&i.to_string())).await.unwrap();
    }
    assert_eq!(a.requests(), 10);

    a.stop();
    wait_endpoint(&pool, a.addr(), ConnectivityState::TransientFailure).await;
    let before_b = b.requests();
    for i in 0..100 {
        client
            .unary(echo(&i.to_string()))
            .await
            .expect("no call fails once the dead endpoint is TransientFailure");
    }
    assert_eq!(
        b.requests() - before_b,
        100,
        "every call went to the live server"
    );
    assert_eq!(pool.state(), ConnectivityState::Ready);
    let dead = pool.snapshot();
    let dead = dead.endpoint(a.addr()).unwrap();
    assert!(
        dead.connections.iter().all(|c| c.last_error.is_some()),
        "{dead:?}"
    );

    a.restart();
    wait_endpoint(&pool, a.addr(), ConnectivityState::Ready).await;
    wait_all_ready(&pool, 4).await;
    let before_a = a.requests();
    for i in 0..20 {
        client.unary(echo(&i.to_string())).await.unwrap();
    }
    assert_eq!(
        a.requests() - before_a,
        10,
        "traffic resumed on the restarted server"
    );
    pool.close().await.unwrap();
}

/// Reconnects wait for the backoff: while a server stays down its slots retry with growing
/// delays (observed as several connect failures), not in a hot loop, and each slot recorded
/// why it failed.
#[tokio::test]
async fn failed_connections_retry_with_backoff() {
    let mut server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    wait_all_ready(&pool, 1).await;
    let mut events = pool.events();
    server.stop();
    // Count failures for a bounded number of events; with a 50..250 ms backoff the slot
    // fails again and again, each time after a delay.
    let mut failures = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while failures < 3 {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("failures keep coming")
            .unwrap();
        if matches!(event.scope, tonic_pool::state::Scope::Connection { .. })
            && event.to == ConnectivityState::TransientFailure
        {
            failures += 1;
        }
    }
    assert_eq!(pool.state(), ConnectivityState::TransientFailure);
    server.restart();
    pool.wait_ready(WAIT).await.unwrap();
    pool.close().await.unwrap();
}
