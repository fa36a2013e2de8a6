//! Balance: N connections per address, and an even round-robin over all of them.

use crate::support;

use std::collections::HashMap;

use support::common::{builder, client, echo, static_target, wait_all_ready, WAIT};
use support::{loopback, TestServer};

/// 3 servers × 4 connections: each server sees exactly 4 TCP connections, and 1 200 unary
/// calls from 8 concurrent callers give every connection 100 ± 1 calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_connections_per_address_share_calls_evenly() {
    let servers: Vec<TestServer> = (2..=4).map(|i| TestServer::start(loopback(i))).collect();
    let refs: Vec<&TestServer> = servers.iter().collect();
    let pool = builder(&static_target(&refs))
        .connections_per_endpoint(4)
        .build()
        .unwrap();
    wait_all_ready(&pool, 12).await;
    for server in &servers {
        assert!(server.wait_for_accepted(4, WAIT).await);
    }

    let mut tasks = Vec::new();
    for worker in 0..8 {
        let mut client = client(&pool);
        tasks.push(tokio::spawn(async move {
            for i in 0..150 {
                client
                    .unary(echo(&format!("{worker}-{i}")))
                    .await
                    .expect("call succeeds");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    let mut per_connection: HashMap<String, u64> = HashMap::new();
    for server in &servers {
        assert_eq!(server.accepted_connections(), 4, "{}", server.addr());
        let by_peer = server.requests_by_peer();
        assert_eq!(by_peer.len(), 4, "{}: {by_peer:?}", server.addr());
        for (peer, n) in by_peer {
            per_connection.insert(format!("{}<-{peer}", server.addr()), n);
        }
    }
    assert_eq!(per_connection.values().sum::<u64>(), 1200);
    for (conn, n) in &per_connection {
        assert!(
            (99..=101).contains(n),
            "{conn} served {n}: {per_connection:?}"
        );
    }
    // The pool counts the same calls.
    let snapshot = pool.snapshot();
    let calls: u64 = snapshot
        .endpoints
        .iter()
        .flat_map(|e| &e.connections)
        .map(|c| c.calls)
        .sum();
    assert_eq!(calls, 1200);
    pool.close().await.unwrap();
}

/// A per-address override gives one address more connections than the others.
#[tokio::test]
async fn per_address_override() {
    let a = TestServer::start(loopback(2));
    let b = TestServer::start(loopback(3));
    let pool = builder(&static_target(&[&a, &b]))
        .connections_per_endpoint(1)
        .connections_for(b.addr(), 3)
        .build()
        .unwrap();
    wait_all_ready(&pool, 4).await;
    assert!(a.wait_for_accepted(1, WAIT).await);
    assert!(b.wait_for_accepted(3, WAIT).await);
    assert_eq!(a.accepted_connections(), 1);
    assert_eq!(b.accepted_connections(), 3);
    let snapshot = pool.snapshot();
    assert_eq!(snapshot.endpoint(b.addr()).unwrap().connections.len(), 3);
    pool.close().await.unwrap();
}
