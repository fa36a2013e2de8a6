//! Keepalive: PINGs that a server finds too eager double the interval (gRFC A8).

use crate::support;

use std::time::Duration;

use support::common::{builder, WAIT};
use support::fake_h2::PingPolicyServer;
use support::loopback;

/// A server that answers PINGs with GOAWAY ENHANCE_YOUR_CALM too_many_pings: the endpoint's
/// keepalive interval doubles after each one (100 ms → 200 ms → 400 ms …), and the reason is
/// visible in the connection's last error.
#[tokio::test]
async fn too_many_pings_doubles_the_interval() {
    let server = PingPolicyServer::start(loopback(2));
    let addr = server.addr();
    let pool = builder(&format!("static:///{addr}"))
        .http2_keep_alive_interval(Duration::from_millis(100))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let doubled_twice = pool
        .wait_until(WAIT, |s| {
            s.endpoint(addr)
                .and_then(|e| e.keepalive_interval)
                .is_some_and(|i| i >= Duration::from_millis(400))
        })
        .await;
    assert!(doubled_twice, "{:#?}", pool.snapshot());
    assert!(server.goaways() >= 2);
    let snapshot = pool.snapshot();
    let endpoint = snapshot.endpoint(addr).unwrap();
    let interval = endpoint.keepalive_interval.unwrap();
    // Exactly a power-of-two multiple of the configured interval.
    let factor = interval.as_millis() / 100;
    assert!(
        factor.is_power_of_two() && interval.as_millis().is_multiple_of(100),
        "{interval:?}"
    );
    assert!(
        snapshot
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("too_many_pings")),
        "{snapshot:#?}"
    );
    pool.close().await.unwrap();
}
