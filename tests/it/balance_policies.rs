//! Balancing policies against real tonic servers: per-address shares with unequal connection
//! counts, least request steering away from a server that holds its calls, pick first's
//! failover and return.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::common::{builder, client, echo, static_target, wait_all_ready};
use support::{loopback, ServerOptions, TestServer};
use tonic_pool::resolve::Push;
use tonic_pool::{Balance, Pool};

/// Makes `calls` unary calls, `workers` at a time, all of which must succeed; returns the
/// name (bound address) of the server that answered each.
async fn spread_calls(pool: &Pool, workers: usize, calls: usize) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let mut client = client(pool);
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            // Bounded: `calls` in all, over every worker.
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let reply = client.unary(echo("share")).await.expect("call succeeds");
                answered.push(reply.into_inner().server);
            }
            answered
        }));
    }
    let mut answered = Vec::new();
    for task in tasks {
        answered.extend(task.await.expect("caller"));
    }
    answered
}

fn count(answered: &[String], server: &TestServer) -> usize {
    answered.iter().filter(|s| **s == server.name()).count()
}

/// Round robin gives an address with 4 connections the same share as addresses with 1
/// (200 ± 1 of 600 calls each, not 400 against 100), and spreads that address's share over
/// its 4 connections (50 ± 1 each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_shares_are_per_address_not_per_connection() {
    let servers: Vec<TestServer> = (2..=4).map(|i| TestServer::start(loopback(i))).collect();
    let refs: Vec<&TestServer> = servers.iter().collect();
    let pool = builder(&static_target(&refs))
        .connections_for(servers[0].addr(), 4)
        .build()
        .unwrap();
    wait_all_ready(&pool, 6).await;

    let answered = spread_calls(&pool, 6, 600).await;
    for server in &servers {
        let n = count(&answered, server);
        assert!((199..=201).contains(&n), "{}: {n} of 600", server.addr());
    }
    let by_connection = servers[0].requests_by_peer();
    assert_eq!(by_connection.len(), 4, "{by_connection:?}");
    for (peer, n) in &by_connection {
        assert!((49..=51).contains(n), "{peer}: {n}: {by_connection:?}");
    }
    pool.close().await.unwrap();
}

/// Least request sends a server that holds every call for a second far fewer calls than
/// its third: 300 calls from 8 callers, of which the slow server gets less than a sixth (in
/// practice a handful: it wins a draw only while it holds fewer calls than the other drawn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_steers_away_from_a_server_holding_calls() {
    let slow = TestServer::start_with(
        loopback(2),
        ServerOptions {
            unary_delay: Duration::from_secs(1),
            ..ServerOptions::default()
        },
    );
    let fast: Vec<TestServer> = (3..=4).map(|i| TestServer::start(loopback(i))).collect();
    let pool = builder(&static_target(&[&slow, &fast[0], &fast[1]]))
        .balance(Balance::LeastRequest)
        .build()
        .unwrap();
    wait_all_ready(&pool, 3).await;

    let answered = spread_calls(&pool, 8, 300).await;
    assert_eq!(answered.len(), 300);
    let on_slow = count(&answered, &slow);
    assert!(on_slow * 6 < 300, "slow server got {on_slow} of 300 calls");
    pool.close().await.unwrap();
}

/// Pick first sends every call to the first address while it is up, fails over to the
/// second when the first server stops, and returns to the first once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pick_first_fails_over_in_order_and_returns() {
    let mut first = TestServer::start(loopback(2));
    let second = TestServer::start(loopback(3));
    let third = TestServer::start(loopback(4));
    let pool = builder(&static_target(&[&first, &second, &third]))
        .balance(Balance::PickFirst)
        .build()
        .unwrap();
    wait_all_ready(&pool, 3).await;

    let answered = spread_calls(&pool, 4, 40).await;
    assert_eq!(count(&answered, &first), 40, "{answered:?}");

    first.stop();
    wait_all_ready(&pool, 2).await;
    let answered = spread_calls(&pool, 4, 40).await;
    assert_eq!(count(&answered, &second), 40, "{answered:?}");

    first.restart();
    wait_all_ready(&pool, 3).await;
    let answered = spread_calls(&pool, 4, 40).await;
    assert_eq!(count(&answered, &first), 40, "{answered:?}");
    pool.close().await.unwrap();
}

/// Pick first follows the resolver's order, not the order in which addresses first
/// appeared: when a pushed set puts the second address first, every call goes there; when
/// that server stops, calls fail over to the next address in the new order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pick_first_follows_the_latest_order() {
    let first = TestServer::start(loopback(2));
    let mut second = TestServer::start(loopback(3));
    let third = TestServer::start(loopback(4));
    let fourth = TestServer::start(loopback(5));
    let push = Push::new();
    push.replace([first.addr(), second.addr(), third.addr()]);
    let pool = builder("push.test:443")
        .balance(Balance::PickFirst)
        .discovery(push.clone())
        .build()
        .unwrap();
    wait_all_ready(&pool, 3).await;
    let answered = spread_calls(&pool, 4, 40).await;
    assert_eq!(count(&answered, &first), 40, "{answered:?}");

    // The same addresses, reordered, and a new one: once the new one is Ready the worker has
    // applied the set, its order included.
    push.replace([second.addr(), first.addr(), third.addr(), fourth.addr()]);
    wait_all_ready(&pool, 4).await;
    let answered = spread_calls(&pool, 4, 40).await;
    assert_eq!(count(&answered, &second), 40, "{answered:?}");

    second.stop();
    wait_all_ready(&pool, 3).await;
    let answered = spread_calls(&pool, 4, 40).await;
    assert_eq!(count(&answered, &first), 40, "{answered:?}");
    pool.close().await.unwrap();
}

/// PeakEWMA, like least request, keeps a server whose every answer takes 200 ms to far
/// less than its third of 300 calls once it has answered (its estimate then outweighs the
/// fast servers' calls in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_steers_away_from_a_slow_server() {
    let slow = TestServer::start_with(
        loopback(2),
        ServerOptions {
            unary_delay: Duration::from_millis(200),
            ..ServerOptions::default()
        },
    );
    let fast: Vec<TestServer> = (3..=4).map(|i| TestServer::start(loopback(i))).collect();
    let pool = builder(&static_target(&[&slow, &fast[0], &fast[1]]))
        .balance(Balance::PeakEwma)
        .build()
        .unwrap();
    wait_all_ready(&pool, 3).await;

    let answered = spread_calls(&pool, 8, 300).await;
    assert_eq!(answered.len(), 300);
    let on_slow = count(&answered, &slow);
    assert!(on_slow * 6 < 300, "slow server got {on_slow} of 300 calls");
    pool.close().await.unwrap();
}
