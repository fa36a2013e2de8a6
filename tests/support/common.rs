//! Small helpers shared by the pool's integration tests.

use std::net::SocketAddr;
use std::time::Duration;

use tonic_pool::{BackoffConfig, ConnectivityState, Pool, PoolBuilder};

use super::echo::echo_client::EchoClient;
use super::echo::EchoRequest;
use super::TestServer;

/// Upper bound of every wait in the tests; generous, since waits end on events.
pub const WAIT: Duration = Duration::from_secs(10);

/// A fast backoff so that reconnects happen in test time: 50 ms growing to 250 ms.
pub fn fast_backoff() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(50),
        multiplier: 1.6,
        jitter: 0.2,
        max: Duration::from_millis(250),
        min_connect_timeout: Duration::from_secs(2),
    }
}

/// `static:///a,b,…` for these servers.
pub fn static_target(servers: &[&TestServer]) -> String {
    let addrs: Vec<String> = servers.iter().map(|s| s.addr().to_string()).collect();
    format!("static:///{}", addrs.join(","))
}

/// `static:///a,b,…` for these addresses.
pub fn static_target_of(addrs: &[SocketAddr]) -> String {
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    format!("static:///{}", addrs.join(","))
}

/// A pool builder with the fast test backoff.
pub fn builder(target: &str) -> PoolBuilder {
    Pool::builder(target).backoff(fast_backoff())
}

/// An echo request with a message.
pub fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        payload: message.as_bytes().to_vec(),
        sleep_ms: 0,
        message: message.to_owned(),
    }
}

/// An echo request the server answers after `sleep_ms`.
pub fn slow_echo(message: &str, sleep_ms: u32) -> EchoRequest {
    EchoRequest {
        sleep_ms,
        ..echo(message)
    }
}

/// A generated client over the pool.
pub fn client(pool: &Pool) -> EchoClient<Pool> {
    EchoClient::new(pool.clone())
}

/// Waits until every connection of every active endpoint is Ready.
pub async fn wait_all_ready(pool: &Pool, connections: usize) {
    let ok = pool
        .wait_until(WAIT, |s| {
            s.state == ConnectivityState::Ready && s.ready_connections() == connections
        })
        .await;
    assert!(
        ok,
        "pool never had {connections} ready connections: {:#?}",
        pool.snapshot()
    );
}

/// Waits until the endpoint at `addr` is in `state`.
pub async fn wait_endpoint(pool: &Pool, addr: SocketAddr, state: ConnectivityState) {
    let ok = pool
        .wait_until(WAIT, |s| s.endpoint(addr).is_some_and(|e| e.state == state))
        .await;
    assert!(
        ok,
        "endpoint {addr} never reached {state}: {:#?}",
        pool.snapshot()
    );
}

/// A loopback address with a port nothing listens on (bound, then released).
pub fn unused_addr(last: u8) -> SocketAddr {
    let listener = std::net::TcpListener::bind(super::loopback(last)).expect("bind");
    listener.local_addr().expect("local addr")
}
