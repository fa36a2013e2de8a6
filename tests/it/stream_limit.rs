//! Stream-limit awareness: connections full at the server's MAX_CONCURRENT_STREAMS are
//! skipped, and an endpoint grows its connections up to a bound instead of queueing calls.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use support::common::{builder, client, echo, slow_echo, WAIT};
use support::{loopback, ServerOptions, TestServer};
use tonic_pool::state::Scope;
use tonic_pool::ConnectivityState;

fn limited(streams: u32) -> ServerOptions {
    ServerOptions {
        max_concurrent_streams: Some(streams),
        ..ServerOptions::default()
    }
}

/// A server allowing `streams` streams per connection, and a pool to it that starts with one
/// connection and may grow to `max`, Ready and aware of the server's limit.
async fn growing_pool(
    streams: u32,
    max: usize,
    configure: impl FnOnce(tonic_pool::PoolBuilder) -> tonic_pool::PoolBuilder,
) -> (TestServer, tonic_pool::Pool) {
    let server = TestServer::start_with(loopback(2), limited(streams));
    let builder = builder(&format!("static:///{}", server.addr()))
        .connections_per_endpoint(1)
        .max_connections_per_endpoint(max);
    let pool = configure(builder).build().unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    assert!(
        pool.wait_until(WAIT, |s| s.endpoints[0].connections[0]
            .max_concurrent_streams
            == Some(streams))
            .await,
        "the pool read the server's limit: {:#?}",
        pool.snapshot()
    );
    (server, pool)
}

/// A server allowing 2 streams per connection and 20 concurrent slow calls: the pool, started
/// with one connection and allowed 16, ends with at least 10 connections and no failed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_connections_make_the_endpoint_grow() {
    let (server, pool) = growing_pool(2, 16, |b| b).await;
    let addr = server.addr();

    let grown = async {
        pool.wait_until(WAIT, |s| {
            s.endpoint(addr).is_some_and(|e| {
                e.connections
                    .iter()
                    .filter(|c| c.state == tonic_pool::ConnectivityState::Ready)
                    .count()
                    >= 10
            })
        })
        .await
    };
    let mut workers = Vec::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for w in 0..20 {
        let mut client = client(&pool);
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            // Bounded: at most 200 calls of 50 ms per worker.
            for i in 0..200 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if let Err(status) = client.unary(slow_echo(&format!("{w}-{i}"), 50)).await {
                    failed.push(status);
                }
            }
            failed
        }));
    }
    let did_grow = grown.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failed = Vec::new();
    for worker in workers {
        failed.extend(worker.await.unwrap());
    }
    let snapshot = pool.snapshot();
    let endpoint = snapshot.endpoint(addr).unwrap();
    println!("grew to {} connections", endpoint.connections.len());
    assert!(did_grow, "{snapshot:#?}");
    assert!(endpoint.connections.len() <= 16);
    assert!(failed.is_empty(), "{failed:?}");
    pool.close().await.unwrap();
}

/// After a burst, the connections that growth opened close once idle; the endpoint's own
/// connection stays, and a new burst grows the endpoint again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grown_connections_retire_when_idle() {
    let (server, pool) =
        growing_pool(2, 8, |b| b.grown_idle_timeout(Duration::from_millis(200))).await;
    let addr = server.addr();
    let own = pool.snapshot().endpoints[0].connections[0].id;
    let mut events = pool.events();

    for burst in 0..2 {
        // 8 callers, 3 calls of 50 ms each, on a 2-stream server: the endpoint grows.
        let callers: Vec<_> = (0..8)
            .map(|i| {
                let mut client = client(&pool);
                tokio::spawn(async move {
                    for j in 0..3 {
                        client.unary(slow_echo(&format!("{i}-{j}"), 50)).await?;
                    }
                    Ok::<_, tonic::Status>(())
                })
            })
            .collect();
        for caller in callers {
            caller
                .await
                .unwrap()
                .expect("no call fails while the endpoint grows");
        }
        assert!(
            pool.wait_until(WAIT, |s| s
                .endpoint(addr)
                .is_some_and(|e| e.connections.len() == 1))
                .await,
            "burst {burst}: the grown connections retire: {:#?}",
            pool.snapshot()
        );
        let snapshot = pool.snapshot();
        let endpoint = snapshot.endpoint(addr).unwrap();
        assert_eq!(
            endpoint.connections[0].id, own,
            "the endpoint's own connection stays"
        );
        assert_eq!(endpoint.connections[0].state, ConnectivityState::Ready);
        let (mut grown, mut retired) = (HashSet::new(), HashSet::new());
        while let Ok(event) = events.try_recv() {
            if let Scope::Connection { id, .. } = event.scope {
                match event.to {
                    ConnectivityState::Ready if id != own => {
                        grown.insert(id);
                    }
                    ConnectivityState::Shutdown => {
                        assert!(event.reason.contains("idle"), "{event:?}");
                        retired.insert(id);
                    }
                    _ => {}
                }
            }
        }
        assert!(!grown.is_empty(), "burst {burst}: the endpoint grew");
        assert_eq!(
            grown, retired,
            "burst {burst}: every grown connection retired, once"
        );
    }
    client(&pool).unary(echo("after")).await.unwrap();
    pool.close().await.unwrap();
}

/// A burst of long calls on a full endpoint that can grow: the calls wait in the pool for the
/// new connections instead of queueing behind the first connection's streams, so they all
/// run at once, two per connection (the server's limit), on four connections. The fourth is
/// the last growth may open: a call that picked just before it was Ready, and then learnt
/// that no further connection is coming, must still find it (this race once failed the test
/// about one run in 35; see `make_room` in src/call.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_waits_for_growth_instead_of_queueing_on_a_full_connection() {
    let (server, pool) = growing_pool(2, 4, |b| b).await;
    let addr = server.addr();
    // Eight calls of 3 s, made at once.
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut client = client(&pool);
            tokio::spawn(async move { client.unary(slow_echo(&format!("{i}"), 3_000)).await })
        })
        .collect();
    // The server sees all eight start while none has ended: they run at once, which its
    // limit of two streams per connection allows only on four connections.
    let all_started = server.wait_for_requests(8, WAIT).await;
    let none_ended = calls.iter().all(|c| !c.is_finished());
    let snapshot = pool.snapshot();
    for call in calls {
        call.await.unwrap().expect("no call fails");
    }
    assert!(all_started && none_ended, "{snapshot:#?}");
    let endpoint = snapshot.endpoint(addr).unwrap();
    assert_eq!(endpoint.connections.len(), 4, "{snapshot:#?}");
    assert!(
        endpoint.connections.iter().all(|c| c.in_flight == 2),
        "{snapshot:#?}"
    );
    pool.close().await.unwrap();
}

/// Without growth enabled the connection count stays put, and full connections still take
/// calls (HTTP/2 queues them) rather than failing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_growth_calls_queue_and_succeed() {
    let server = TestServer::start_with(loopback(2), limited(1));
    let pool = builder(&format!("static:///{}", server.addr()))
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    support::common::wait_all_ready(&pool, 2).await;
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut client = client(&pool);
            tokio::spawn(async move { client.unary(slow_echo(&i.to_string(), 20)).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().expect("queued, not failed");
    }
    assert_eq!(pool.snapshot().endpoints[0].connections.len(), 2);
    pool.close().await.unwrap();
}
