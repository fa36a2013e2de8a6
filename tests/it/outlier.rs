//! Outlier detection (gRFC A50) against real tonic servers: a server whose every call fails
//! while its transport is fine is ejected — it gets no new call — and comes back after its
//! ejection time.
//!
//! A50's minimum hosts is 5, so every test runs five or six servers (127.0.0.2..7), with a
//! short interval and a small request volume so that a few callers fill an interval.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::Code;
use tonic_pool::{
    FailurePercentageEjection, OutlierDetection, Pool, PoolSnapshot, SuccessRateEjection,
};

use crate::support::common::{
    builder, client, drive_load, echo, static_target, wait_all_ready, WAIT,
};
use crate::support::{loopback, ServerOptions, TestServer};

const INTERVAL: Duration = Duration::from_millis(200);

/// `n` servers on 127.0.0.2.., those at the indexes in `failing` failing every unary call
/// with UNAVAILABLE.
fn servers(n: u8, failing: &[u8]) -> Vec<TestServer> {
    (0..n)
        .map(|i| {
            TestServer::start_with(
                loopback(2 + i),
                ServerOptions {
                    fail_unary: failing.contains(&i),
                    ..ServerOptions::default()
                },
            )
        })
        .collect()
}

async fn pool_over(servers: &[TestServer], detection: OutlierDetection) -> Pool {
    let refs: Vec<&TestServer> = servers.iter().collect();
    let pool = builder(&static_target(&refs))
        .outlier_detection(detection)
        .build()
        .expect("pool");
    wait_all_ready(&pool, servers.len()).await;
    pool
}

fn is_ejected(snapshot: &PoolSnapshot, addr: SocketAddr) -> bool {
    snapshot.endpoint(addr).is_some_and(|e| e.ejected)
}

fn ejected_count(snapshot: &PoolSnapshot) -> usize {
    snapshot.endpoints.iter().filter(|e| e.ejected).count()
}

/// Calls from four callers until `condition` holds for a snapshot (at most [`WAIT`]);
/// returns whether it did.
async fn load_until(pool: &Pool, condition: impl FnMut(&PoolSnapshot) -> bool + Send) -> bool {
    let reached = std::sync::atomic::AtomicBool::new(false);
    drive_load(pool, 4, 0, WAIT, async {
        if pool.wait_until(WAIT, condition).await {
            reached.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .await;
    reached.into_inner()
}

/// Success-rate ejection (on by default): the one server of six that fails every call is
/// ejected, and only it; while ejected it receives no new call (every call succeeds on the
/// others) and the snapshot's table shows it; after its ejection time it comes back and
/// receives calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_ejects_a_failing_server_until_its_time_passes() {
    let servers = servers(6, &[0]);
    let bad = servers[0].addr();
    let detection = OutlierDetection::default()
        .interval(INTERVAL)
        .base_ejection_time(Duration::from_secs(2))
        .success_rate(Some(SuccessRateEjection::default().request_volume(10)));
    let pool = pool_over(&servers, detection).await;

    assert!(
        load_until(&pool, |s| is_ejected(s, bad)).await,
        "the failing server was not ejected: {}",
        pool.snapshot()
    );
    let snapshot = pool.snapshot();
    assert_eq!(ejected_count(&snapshot), 1, "{snapshot}");
    assert_eq!(snapshot.endpoint(bad).unwrap().ejection_count, 1);
    assert!(format!("{snapshot}").contains("(ejected)"), "{snapshot}");
    // The O(1) summary counts it too, Ready as its connections are.
    let summary = pool.summary();
    assert_eq!(summary.ejected_endpoints, 1, "{summary:?}");
    assert_eq!(summary.endpoints.ready, 6, "{summary:?}");

    // Ejected: every new call goes to the others.
    let before = servers[0].requests();
    let mut client = client(&pool);
    for i in 0..30 {
        client
            .unary(echo(&format!("while ejected {i}")))
            .await
            .unwrap_or_else(|status| panic!("call {i} reached the failing server: {status}"));
    }
    assert_eq!(servers[0].requests(), before);
    // Still the same ejection (the checks above ran inside it).
    let snapshot = pool.snapshot();
    assert!(is_ejected(&snapshot, bad), "{snapshot}");
    assert_eq!(snapshot.endpoint(bad).unwrap().ejection_count, 1);

    // No traffic meanwhile, so nothing to eject it again: it comes back.
    assert!(
        pool.wait_until(WAIT, |s| !is_ejected(s, bad)).await,
        "never un-ejected: {}",
        pool.snapshot()
    );
    assert_eq!(pool.snapshot().endpoint(bad).unwrap().ejection_count, 1);
    assert_eq!(pool.summary().ejected_endpoints, 0);
    // Round robin over six addresses: twelve calls reach it again.
    for i in 0..12 {
        let _ = client.unary(echo(&format!("after {i}"))).await;
    }
    assert!(servers[0].requests() > before, "no call after un-ejection");
}

/// Failure-percentage ejection, once configured (success rate off): the server of five whose
/// calls all fail is above the threshold and ejected; the others are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_percentage_ejects_when_configured() {
    let servers = servers(5, &[2]);
    let bad = servers[2].addr();
    let detection = OutlierDetection::default()
        .interval(INTERVAL)
        .success_rate(None)
        .failure_percentage(Some(
            FailurePercentageEjection::default()
                .threshold(50)
                .request_volume(10),
        ));
    let pool = pool_over(&servers, detection).await;
    assert!(
        load_until(&pool, |s| is_ejected(s, bad)).await,
        "the failing server was not ejected: {}",
        pool.snapshot()
    );
    let snapshot = pool.snapshot();
    assert_eq!(ejected_count(&snapshot), 1, "{snapshot}");
}

/// Max ejection percent (10 % of six addresses: one at a time) holds while three servers
/// fail every call: over several ejections, no snapshot ever shows two ejected at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_is_respected() {
    let servers = servers(6, &[0, 1, 2]);
    let detection = OutlierDetection::default()
        .interval(INTERVAL)
        .base_ejection_time(INTERVAL)
        .success_rate(None)
        .failure_percentage(Some(
            FailurePercentageEjection::default()
                .threshold(50)
                .request_volume(10),
        ));
    let pool = pool_over(&servers, detection).await;
    let mut most = 0;
    let reached = load_until(&pool, |s| {
        most = most.max(ejected_count(s));
        s.endpoints.iter().map(|e| e.ejection_count).sum::<u64>() >= 3
    })
    .await;
    assert!(reached, "fewer than three ejections: {}", pool.snapshot());
    assert_eq!(most, 1, "more than 10 % ejected at once");
}

/// With every address an outlier (max ejection percent 100, all five servers failing), all
/// are ejected, and calls still go to them — failing with the servers' own status — rather
/// than failing for want of a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_to_ejected_servers_when_all_are_ejected() {
    let servers = servers(5, &[0, 1, 2, 3, 4]);
    let detection = OutlierDetection::default()
        .interval(INTERVAL)
        // Longer than the wait below: the servers stay ejected throughout.
        .base_ejection_time(Duration::from_secs(60))
        .max_ejection_percent(100)
        .success_rate(None)
        .failure_percentage(Some(
            FailurePercentageEjection::default()
                .threshold(50)
                .request_volume(10),
        ));
    let pool = pool_over(&servers, detection).await;
    // Bounded: were the ejected servers unpickable, the callers' calls would wait for a
    // connection until the ejections end (60 s) and the load would not stop.
    let all_ejected = tokio::time::timeout(2 * WAIT, load_until(&pool, |s| ejected_count(s) == 5))
        .await
        .unwrap_or_else(|_| panic!("calls hung with every server ejected: {}", pool.snapshot()));
    assert!(
        all_ejected,
        "not every server was ejected: {}",
        pool.snapshot()
    );
    let without_connection = pool.snapshot().calls_without_connection;
    let before: u64 = servers.iter().map(TestServer::requests).sum();
    let mut client = client(&pool);
    for i in 0..10 {
        let status = tokio::time::timeout(WAIT, client.unary(echo(&format!("all ejected {i}"))))
            .await
            .unwrap_or_else(|_| panic!("call {i} found no server: {}", pool.snapshot()))
            .expect_err("every server fails");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("fails every call"), "{status:?}");
    }
    let after: u64 = servers.iter().map(TestServer::requests).sum();
    assert_eq!(after - before, 10);
    assert_eq!(pool.snapshot().calls_without_connection, without_connection);
}

/// `build()` refuses out-of-range outlier detection settings, naming them.
#[tokio::test]
async fn invalid_settings_are_refused() {
    let cases = [
        (
            OutlierDetection::default().interval(Duration::ZERO),
            "interval",
        ),
        (
            OutlierDetection::default().max_ejection_percent(101),
            "max_ejection_percent",
        ),
        (
            OutlierDetection::default().failure_percentage(Some(
                FailurePercentageEjection::default().enforcement_percentage(120),
            )),
            "failure_percentage.enforcement_percentage",
        ),
    ];
    for (detection, name) in cases {
        let err = Pool::builder("static:///127.0.0.1:1")
            .outlier_detection(detection)
            .build()
            .expect_err("invalid");
        assert!(err.is_invalid_config(), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

/// With the `metrics` feature, an ejection counts in `tonic_pool.outlier.ejections` by
/// reason, and `tonic_pool.outlier.ejected` holds how many are out.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn ejections_are_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    // A local recorder sees this thread only: the current-thread runtime runs the pool here.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let servers = servers(5, &[4]);
    let detection = OutlierDetection::default()
        .interval(INTERVAL)
        .success_rate(None)
        .failure_percentage(Some(
            FailurePercentageEjection::default()
                .threshold(50)
                .request_volume(10),
        ));
    let pool = pool_over(&servers, detection).await;
    let bad = servers[4].addr();
    assert!(
        load_until(&pool, |s| is_ejected(s, bad)).await,
        "the failing server was not ejected: {}",
        pool.snapshot()
    );
    let recorded = snapshotter.snapshot().into_vec();
    let value = |name: &str, label: Option<(&str, &str)>| {
        recorded
            .iter()
            .find(|(key, ..)| {
                let key = key.key();
                key.name() == name
                    && label
                        .is_none_or(|(k, v)| key.labels().any(|l| l.key() == k && l.value() == v))
            })
            .map(|(.., value)| value)
    };
    assert_eq!(
        value(
            "tonic_pool.outlier.ejections",
            Some(("reason", "failure_percentage"))
        ),
        Some(&DebugValue::Counter(1))
    );
    match value("tonic_pool.outlier.ejected", None) {
        Some(DebugValue::Gauge(g)) => assert_eq!(g.into_inner(), 1.0),
        other => panic!("tonic_pool.outlier.ejected: {other:?}"),
    }
}
