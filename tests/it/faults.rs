//! Network faults from a proxy of our own: a black-holed peer, and connections reset mid-call.

use crate::support;

use std::time::Duration;

use support::common::{
    builder, client, drive_load, slow_echo, wait_all_ready, wait_endpoint, WAIT,
};
use support::proxy::{Mode, TestProxy};
use support::{loopback, TestServer};
use tokio::time::Instant;
use tonic::Code;
use tonic_pool::state::Scope;
use tonic_pool::ConnectivityState;

/// The proxy black-holes one address (accepts, forwards nothing). With keepalive 1 s / 1 s
/// the pool routes around it within interval + timeout of the stall (plus scheduling slack on
/// a loaded machine; the exact bound is checked on a paused clock in the driver's unit tests);
/// afterwards no call fails, and its reconnects never count as Ready while the peer stays
/// silent. Healed, it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_address_is_routed_around() {
    let a = TestServer::start(loopback(2));
    let b = TestServer::start(loopback(3));
    let proxy = TestProxy::start(loopback(5), a.addr());
    let stalled = proxy.addr();
    let pool = builder(&format!("static:///{stalled},{}", b.addr()))
        .connections_per_endpoint(2)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    wait_all_ready(&pool, 4).await;

    let routed_around = async {
        assert!(a.wait_for_requests(20, WAIT).await);
        let stall = Instant::now();
        proxy.set_mode(Mode::Blackhole);
        wait_endpoint(&pool, stalled, ConnectivityState::TransientFailure).await;
        stall.elapsed()
    };
    let (report, elapsed) = {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let scenario = async {
            let _ = tx.send(routed_around.await);
        };
        let report = drive_load(&pool, 4, 1, Duration::from_secs(20), scenario).await;
        (report, rx.await.expect("scenario ran"))
    };
    println!(
        "black hole: routed around after {elapsed:?}; {} ok, {} failed while detecting",
        report.ok,
        report.failed.len()
    );
    // Keepalive 1 s + 1 s after the last byte read, which is at most the stall itself; the
    // slack covers a machine busy with other tests (2.51 s was seen with 0.5 s of slack).
    assert!(elapsed <= Duration::from_millis(3500), "took {elapsed:?}");
    for status in &report.failed {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    // From here on no call fails, and the silent peer never becomes Ready.
    let mut events = pool.events();
    let after = drive_load(
        &pool,
        4,
        1,
        Duration::from_secs(2),
        tokio::time::sleep(Duration::from_secs(2)),
    )
    .await;
    assert!(after.failed.is_empty(), "{:?}", after.failed);
    assert!(after.ok > 0);
    while let Ok(event) = events.try_recv() {
        if let Scope::Connection { addr, .. } = &event.scope {
            assert!(
                !(*addr == stalled && event.to == ConnectivityState::Ready),
                "a black-holed connection became Ready: {event:?}"
            );
        }
    }

    proxy.set_mode(Mode::Forward);
    wait_endpoint(&pool, stalled, ConnectivityState::Ready).await;
    pool.close().await.unwrap();
}

/// The proxy resets every connection to one address mid-call: calls in flight there fail
/// with UNAVAILABLE (not UNKNOWN), later calls succeed on the other address, and the address
/// comes back when the proxy heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_connections_fail_in_flight_calls_as_unavailable() {
    let a = TestServer::start(loopback(2));
    let b = TestServer::start(loopback(3));
    let proxy = TestProxy::start(loopback(6), a.addr());
    let flaky = proxy.addr();
    let pool = builder(&format!("static:///{flaky},{}", b.addr()))
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;

    // Six slow calls: round-robin puts three on each address.
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let mut client = client(&pool);
            tokio::spawn(async move { client.unary(slow_echo(&i.to_string(), 2_000)).await })
        })
        .collect();
    assert!(a.wait_for_requests(3, WAIT).await);
    assert!(b.wait_for_requests(3, WAIT).await);
    proxy.set_mode(Mode::ResetAll);
    let mut failed = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 3, "exactly the calls on the reset address failed");

    let mut client = client(&pool);
    let before = b.requests();
    for i in 0..20 {
        client
            .unary(slow_echo(&i.to_string(), 0))
            .await
            .expect("later calls succeed");
    }
    assert_eq!(b.requests() - before, 20);

    proxy.set_mode(Mode::Forward);
    wait_endpoint(&pool, flaky, ConnectivityState::Ready).await;
    let before = a.requests();
    for i in 0..10 {
        client.unary(slow_echo(&i.to_string(), 0)).await.unwrap();
    }
    assert!(
        a.requests() > before,
        "the healed address gets traffic again"
    );
    pool.close().await.unwrap();
}
