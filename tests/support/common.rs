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

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Calls that succeeded.
    pub ok: u64,
    /// Every failed call's status.
    pub failed: Vec<tonic::Status>,
}

/// Runs `workers` closed-loop callers against the pool until `stop` resolves (and at most
/// `max` in time), each call asking the server to sleep `sleep_ms`.
pub async fn drive_load<F>(
    pool: &Pool,
    workers: usize,
    sleep_ms: u32,
    max: Duration,
    stop: F,
) -> LoadReport
where
    F: std::future::Future<Output = ()> + Send,
{
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut client = client(pool);
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            let deadline = tokio::time::Instant::now() + max;
            let mut i = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed)
                && tokio::time::Instant::now() < deadline
            {
                match client.unary(slow_echo(&format!("{w}-{i}"), sleep_ms)).await {
                    Ok(_) => report.ok += 1,
                    Err(status) => report.failed.push(status),
                }
                i += 1;
            }
            report
        }));
    }
    let _ = tokio::time::timeout(max, stop).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = LoadReport::default();
    for task in tasks {
        let report = task.await.expect("load task");
        total.ok += report.ok;
        total.failed.extend(report.failed);
    }
    total
}
