//! What the pool shows of itself: the counters of `snapshot()` after a scripted run, and the
//! snapshot's table.

use crate::support;

use std::time::{Duration, Instant};

use support::common::{
    builder, client, echo, slow_echo, static_target, wait_all_ready, wait_endpoint, WAIT,
};
use support::{loopback, TestServer};
use tonic_pool::{CallCounts, ConnectivityState, PoolSnapshot};

/// The scripted run both tests read: on one server with two connections, `OK` calls
/// succeed, `FAILED` calls get INTERNAL from the server, one call passes its deadline; then
/// the server stops gracefully (a GOAWAY on each connection), one call fails while no
/// connection is Ready, and the server comes back.
const OK: u64 = 10;
const FAILED: u64 = 3;

async fn scripted_run(server: &mut TestServer, pool: &tonic_pool::Pool) {
    let mut client = client(pool);
    for i in 0..OK {
        client
            .unary(echo(&format!("ok {i}")))
            .await
            .expect("call ok");
    }
    for _ in 0..FAILED {
        let status = client.unary(echo("status:13")).await.expect_err("INTERNAL");
        assert_eq!(status.code(), tonic::Code::Internal);
    }
    let mut late = tonic::Request::new(slow_echo("late", 5_000));
    late.set_timeout(Duration::from_millis(100));
    let status = client.unary(late).await.expect_err("deadline");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);

    let addr = server.addr();
    assert!(server.graceful_stop(WAIT).await, "graceful stop finished");
    wait_endpoint(pool, addr, ConnectivityState::TransientFailure).await;
    let status = client.unary(echo("down")).await.expect_err("no connection");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    server.restart();
    wait_all_ready(pool, 2).await;
}

/// After the scripted run the counters say exactly what happened: per connection and per
/// endpoint, calls by class of status (OK, INTERNAL, the deadline), a GOAWAY NO_ERROR and a
/// disconnection by GOAWAY on each connection, every connect attempt either failed or
/// succeeded (two connects each), the call that found no connection, and the times of the
/// last call and state change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_after_a_scripted_run() {
    let mut server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server]))
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;
    let started = Instant::now();
    scripted_run(&mut server, &pool).await;

    let snapshot = pool.snapshot();
    let endpoint = snapshot.endpoint(server.addr()).expect("endpoint");
    let counters = &endpoint.counters;
    let mut expected = CallCounts::default();
    expected.started = OK + FAILED + 1;
    expected.succeeded = OK;
    expected.errors = FAILED;
    expected.cancelled = 1;
    assert_eq!(counters.calls, expected, "{snapshot:#?}");
    assert_eq!(counters.disconnections.goaway, 2);
    assert_eq!(counters.disconnections.total(), 2);
    assert_eq!(
        counters.goaways.get(&0),
        Some(&2),
        "GOAWAY NO_ERROR on each"
    );
    assert_eq!(counters.goaways.len(), 1);
    assert_eq!(
        counters.connect_attempts,
        counters.connect_failures + 4,
        "two connects per connection, every other attempt failed: {counters:?}"
    );
    assert!(counters.last_call.is_some_and(|t| t >= started));
    assert_eq!(snapshot.calls_without_connection, 1);
    assert_eq!(
        snapshot.counters, *counters,
        "the pool's are its endpoint's"
    );

    // Per connection: they add up to the endpoint's, each was disconnected once.
    let mut sum = tonic_pool::Counters::default();
    for conn in &endpoint.connections {
        assert_eq!(conn.counters.disconnections.goaway, 1);
        assert_eq!(conn.connects, 2);
        assert!(conn.state_since >= started, "Ready again since the restart");
        let c = &conn.counters.calls;
        assert_eq!(c.started, c.succeeded + c.failed() + c.retried);
        sum.calls.started += c.started;
    }
    assert_eq!(sum.calls.started, counters.calls.started);

    // The counts survive the close (the slots end, their endpoint goes with them).
    pool.close().await.unwrap();
    let closed = pool.snapshot();
    assert_eq!(closed.counters.calls, expected);
    assert_eq!(closed.counters.disconnections.shutdown, 2);
}

/// The table has the pool's line, a header, a row per endpoint and one per connection, with
/// the columns of `grpcdebug channelz`; the numbers are the snapshot's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_table_shape() {
    let mut server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server]))
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;
    scripted_run(&mut server, &pool).await;
    let snapshot: PoolSnapshot = pool.snapshot();
    let table = snapshot.to_string();
    println!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines.len(),
        2 + 1 + 2,
        "pool, header, endpoint, two connections"
    );
    assert!(
        lines[0].starts_with("pool READY  in flight 0  calls 14  failed 4  without connection 1")
    );
    let cells = |line: &str| -> Vec<String> {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        cells(lines[1]),
        [
            "ENDPOINT",
            "CONN",
            "STATE",
            "IN FLIGHT",
            "CALLS",
            "FAILED",
            "LAST ERROR"
        ]
    );
    let addr = server.addr().to_string();
    assert_eq!(
        cells(lines[2]),
        [addr.as_str(), "*", "READY", "0", "14", "4"]
    );
    for (line, conn) in lines[3..].iter().zip(&snapshot.endpoints[0].connections) {
        let row = cells(line);
        assert_eq!(row[0], conn.id.to_string());
        assert_eq!(row[1], "READY");
        assert_eq!(row[3], conn.counters.calls.started.to_string());
        // Its last error (the refused reconnect while the server was down) ends the row.
        assert_eq!(row.len(), 6, "{row:?}");
        assert_eq!(Some(&row[5]), conn.last_error.as_ref());
    }
    // Columns line up: every row's state column starts where the header's does.
    let state_at = lines[1].find("STATE").unwrap();
    for line in &lines[2..] {
        assert!(line[state_at..].starts_with("READY"), "{line}");
    }
    pool.close().await.unwrap();
}
