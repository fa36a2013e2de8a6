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

/// The pool of the scripted run, Ready, over its server; and the pool's target.
async fn scripted_pool() -> (TestServer, tonic_pool::Pool, String) {
    let server = TestServer::start(loopback(2));
    let target = static_target(&[&server]);
    let pool = builder(&target)
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;
    (server, pool, target)
}

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
    // The server's timer (tonic answers CANCELLED) races the pool's (DEADLINE_EXCEEDED):
    // both are the caller's class.
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );

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
    let (mut server, pool, _) = scripted_pool().await;
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

/// Transparent retries are counted on the connection that could not take the call: a
/// server that refuses every stream sees each call twice (gRFC A6 allows one retry after
/// REFUSED_STREAM), and the counters say one attempt `retried` and one `unavailable` per
/// call, attempts started being what the server saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_count_as_retried() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use support::hostile::{code, HostileServer, Peer};

    let seen = Arc::new(AtomicU64::new(0));
    let server = HostileServer::start({
        let seen = seen.clone();
        move |mut peer: Peer| {
            let seen = seen.clone();
            async move {
                peer.send_settings(&[]).await?;
                loop {
                    let (id, _) = peer.expect_request().await?;
                    seen.fetch_add(1, Ordering::SeqCst);
                    peer.send_rst(id, code::REFUSED_STREAM).await?;
                }
            }
        }
    });
    let pool = builder(&server.target())
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;
    let mut client = client(&pool);
    const CALLS: u64 = 3;
    for _ in 0..CALLS {
        let status = client.unary(echo("refused")).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    let calls = pool.snapshot().counters.calls;
    let attempts = seen.load(Ordering::SeqCst);
    assert_eq!(calls.started, attempts, "{calls:?}");
    assert_eq!(calls.unavailable, CALLS, "{calls:?}");
    assert_eq!(calls.retried, attempts - CALLS, "{calls:?}");
    assert!(
        calls.retried >= 1,
        "at least one call was retried: {calls:?}"
    );
    assert_eq!(calls.failed(), CALLS);
    pool.close().await.unwrap();
}

/// The metrics (feature `metrics`) after the scripted run, read from `metrics-util`'s
/// debugging recorder set for this test's thread (the pool runs on it: a current-thread
/// runtime), so that no other test's pool is counted: gRFC A66's per-attempt and per-call
/// metrics by method and status, A94's connection metrics, the round-robin gauges and the
/// resolutions, exactly where the run fixes them and equal to the snapshot's counters where
/// it does not (failed reconnects).
#[cfg(feature = "metrics")]
#[tokio::test]
async fn metrics_after_a_scripted_run() {
    use metrics_util::debugging::DebuggingRecorder;
    use prost::Message as _;
    use recorded::{counter, gauge, histogram};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let (mut server, pool, target) = scripted_pool().await;
    scripted_run(&mut server, &pool).await;
    let counters = pool.snapshot().counters;

    // Each snapshot of the debugging recorder takes the values since the last one.
    let values = |snapshot: metrics_util::debugging::Snapshot| {
        snapshot
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let (_, key) = key.into_parts();
                let labels: Vec<(String, String)> = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                for (name, value) in &labels {
                    if name == "grpc.target" {
                        assert_eq!(value, &target, "{}", key.name());
                    }
                }
                (key.name().to_owned(), labels, value)
            })
            .collect::<Vec<_>>()
    };
    let run = values(snapshotter.snapshot());
    let method = [("grpc.method", "echo.Echo/Unary")];

    // A66: 14 attempts, each ended once; 15 calls (one never found a connection).
    assert_eq!(
        counter(&run, "grpc.client.attempt.started", &method),
        OK + FAILED + 1
    );
    let attempts = |status| histogram(&run, "grpc.client.attempt.duration", status).len() as u64;
    assert_eq!(attempts("OK"), OK);
    assert_eq!(attempts("INTERNAL"), FAILED);
    assert_eq!(attempts("CANCELLED") + attempts("DEADLINE_EXCEEDED"), 1);
    let calls = |status| histogram(&run, "grpc.client.call.duration", status).len() as u64;
    assert_eq!(calls("OK"), OK);
    assert_eq!(calls("INTERNAL"), FAILED);
    assert_eq!(calls("CANCELLED") + calls("DEADLINE_EXCEEDED"), 1);
    assert_eq!(calls("UNAVAILABLE"), 1, "the call that found no connection");
    // Message sizes: the request's protobuf bytes exactly; replies carry something, errors nothing.
    let sent = histogram(
        &run,
        "grpc.client.attempt.sent_total_compressed_message_size",
        "OK",
    );
    assert_eq!(sent, vec![echo("ok 0").encoded_len() as f64; OK as usize]);
    let rcvd = histogram(
        &run,
        "grpc.client.attempt.rcvd_total_compressed_message_size",
        "OK",
    );
    assert_eq!(rcvd.len() as u64, OK);
    assert!(rcvd.iter().all(|&n| n > 0.0), "{rcvd:?}");
    let rcvd_failed = histogram(
        &run,
        "grpc.client.attempt.rcvd_total_compressed_message_size",
        "INTERNAL",
    );
    assert_eq!(rcvd_failed, vec![0.0; FAILED as usize]);

    // A94: two connects before and two after the restart, a GOAWAY NO_ERROR on each.
    let succeeded = counter(&run, "grpc.subchannel.connection_attempts_succeeded", &[]);
    assert_eq!(succeeded, 4);
    assert_eq!(
        counter(&run, "grpc.subchannel.connection_attempts_failed", &[]),
        counters.connect_failures,
        "the metric is the snapshot's count"
    );
    let goaway = [("grpc.disconnect_error", "GOAWAY NO_ERROR")];
    assert_eq!(counter(&run, "grpc.subchannel.disconnections", &goaway), 2);
    assert_eq!(gauge(&run, "grpc.subchannel.open_connections"), 2.0);
    assert_eq!(gauge(&run, "grpc.lb.rr.endpoints"), 1.0);
    assert_eq!(gauge(&run, "grpc.lb.rr.endpoints.ready"), 1.0);
    let ok = [("grpc.resolver.result", "ok")];
    assert_eq!(counter(&run, "grpc.resolver.resolutions", &ok), 1);
    assert_eq!(gauge(&run, "grpc.resolver.addresses"), 1.0);
    // The pool's own: no call is left waiting, nothing was retried, grown or drained.
    assert_eq!(gauge(&run, "tonic_pool.calls.waiting"), 0.0);
    assert_eq!(counter(&run, "tonic_pool.transparent_retries", &[]), 0);
    assert_eq!(counter(&run, "tonic_pool.connections.grown", &[]), 0);
    assert_eq!(counter(&run, "tonic_pool.drains", &[]), 0);

    // Closing shuts both connections down.
    pool.close().await.unwrap();
    let close = values(snapshotter.snapshot());
    let shutdown = [("grpc.disconnect_error", "subchannel shutdown")];
    assert_eq!(
        counter(&close, "grpc.subchannel.disconnections", &shutdown),
        2
    );
    assert_eq!(
        gauge(&close, "grpc.subchannel.open_connections"),
        -2.0,
        "two fewer"
    );
}

/// The pool's own lifecycle metrics: connections that growth opened (`grown`), the same
/// connections closed again once idle (`retired`), and an address that left the set
/// (`drains`), counted exactly as often as the pool did each.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn lifecycle_metrics_count_growth_retirement_and_drains() {
    use metrics_util::debugging::DebuggingRecorder;
    use recorded::counter;
    use support::common::slow_echo;
    use support::ServerOptions;
    use tonic_pool::resolve::Push;

    // A current-thread test: the recorder is this thread's, and so are the pool's tasks.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    // One stream per connection on the first server, so that concurrent calls grow it.
    let limited = TestServer::start_with(
        loopback(2),
        ServerOptions {
            max_concurrent_streams: Some(1),
            ..ServerOptions::default()
        },
    );
    let other = TestServer::start(loopback(3));
    // The limited server alone at first: with another address that has room, calls would go
    // there instead of growing the full one.
    let push = Push::new();
    push.insert(limited.addr());
    let pool = builder("lifecycle.test:50051")
        .discovery(push.clone())
        .connections_per_endpoint(1)
        .max_connections_per_endpoint(4)
        .grown_idle_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    wait_all_ready(&pool, 1).await;
    assert!(
        pool.wait_until(WAIT, |s| s
            .endpoint(limited.addr())
            .is_some_and(|e| e.connections[0].max_concurrent_streams == Some(1)))
            .await,
        "the pool read the limit: {:#?}",
        pool.snapshot()
    );

    // A burst: 4 concurrent slow calls to the one-stream server.
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let mut client = client(&pool);
            tokio::spawn(async move { client.unary(slow_echo(&format!("burst-{i}"), 100)).await })
        })
        .collect();
    for call in calls {
        call.await
            .unwrap()
            .expect("no call fails while the endpoint grows");
    }
    // Growth's connections close once idle; the endpoint's own one stays.
    assert!(
        pool.wait_until(WAIT, |s| s
            .endpoint(limited.addr())
            .is_some_and(|e| e.connections.len() == 1))
            .await,
        "grown connections retired: {:#?}",
        pool.snapshot()
    );
    // The other server joins, the limited one leaves: it drains.
    push.insert(other.addr());
    wait_endpoint(&pool, other.addr(), ConnectivityState::Ready).await;
    push.remove(limited.addr());
    assert!(
        pool.wait_until(WAIT, |s| s.endpoint(limited.addr()).is_none())
            .await,
        "the removed address drained: {:#?}",
        pool.snapshot()
    );

    let all: Vec<_> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect();
    let grown = counter(&all, "tonic_pool.connections.grown", &[]);
    assert!(grown >= 1, "the burst grew the endpoint: {all:#?}");
    assert_eq!(
        counter(&all, "tonic_pool.connections.retired", &[]),
        grown,
        "every grown connection retired once idle"
    );
    assert_eq!(
        counter(&all, "tonic_pool.drains", &[]),
        1,
        "one address drained"
    );
    pool.close().await.unwrap();
}

/// What a pool with one connection through `proxy` counts once `fault` broke that
/// connection: the endpoint's disconnections (after the first one is counted) and, with
/// the `metrics` feature, each `grpc.disconnect_error` of `grpc.subchannel.disconnections`
/// with its count. The test runs on a current-thread runtime so that the debugging recorder
/// of its thread sees the pool's every emission.
async fn one_lost_connection(
    pool: tonic_pool::Pool,
    fault: impl FnOnce(),
) -> (tonic_pool::Disconnections, Vec<(String, u64)>) {
    #[cfg(feature = "metrics")]
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    #[cfg(feature = "metrics")]
    let _local = metrics::set_default_local_recorder(&recorder);
    wait_all_ready(&pool, 1).await;
    fault();
    assert!(
        pool.wait_until(WAIT, |s| s.counters.disconnections.total() >= 1)
            .await,
        "the connection was lost: {:#?}",
        pool.snapshot()
    );
    let disconnections = pool.snapshot().counters.disconnections;
    #[allow(unused_mut)]
    let mut errors = Vec::new();
    #[cfg(feature = "metrics")]
    for (key, _, _, value) in recorder.snapshotter().snapshot().into_vec() {
        let (_, key) = key.into_parts();
        if key.name() != "grpc.subchannel.disconnections" {
            continue;
        }
        let error = key
            .labels()
            .find(|l| l.key() == "grpc.disconnect_error")
            .map(|l| l.value().to_owned())
            .unwrap_or_default();
        let metrics_util::debugging::DebugValue::Counter(n) = value else {
            panic!("{error}: {value:?}");
        };
        errors.push((error, n));
    }
    pool.close().await.unwrap();
    (disconnections, errors)
}

/// A peer that resets the TCP connection (the proxy closes both sides with RST) is counted
/// as a `reset` disconnection, and in the metrics as gRFC A94's `connection reset` — not a
/// keepalive timeout, a GOAWAY nor a shutdown.
#[tokio::test]
async fn a_reset_connection_counts_as_connection_reset() {
    use support::proxy::TestProxy;

    let server = TestServer::start(loopback(2));
    let proxy = TestProxy::start(loopback(7), server.addr());
    let pool = builder(&format!("static:///{}", proxy.addr()))
        .build()
        .unwrap();
    let (disconnections, errors) = one_lost_connection(pool, || proxy.reset_all()).await;
    assert_eq!(disconnections.reset, 1, "{disconnections:?}");
    assert_eq!(disconnections.total(), 1, "{disconnections:?}");
    if cfg!(feature = "metrics") {
        assert_eq!(errors, [("connection reset".to_owned(), 1)]);
    }
}

/// A peer that stops answering (the proxy black-holes the connection) is found by keepalive:
/// the PING goes unanswered, and the disconnection is counted as a `keepalive_timeout`, in
/// the metrics as gRFC A94's `connection timed out` (which covers keepalive) — not as a
/// reset, though the pool drops the connection itself.
#[tokio::test]
async fn an_unanswered_keepalive_counts_as_connection_timed_out() {
    use support::proxy::{Mode, TestProxy};

    let server = TestServer::start(loopback(2));
    let proxy = TestProxy::start(loopback(8), server.addr());
    let pool = builder(&format!("static:///{}", proxy.addr()))
        .http2_keep_alive_interval(Duration::from_millis(200))
        .keep_alive_timeout(Duration::from_millis(300))
        .keep_alive_while_idle(true)
        // Reconnects through the black hole never finish their handshake: connect
        // failures, not disconnections.
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let (disconnections, errors) =
        one_lost_connection(pool, || proxy.set_mode(Mode::Blackhole)).await;
    assert_eq!(disconnections.keepalive_timeout, 1, "{disconnections:?}");
    assert_eq!(disconnections.total(), 1, "{disconnections:?}");
    if cfg!(feature = "metrics") {
        assert_eq!(errors, [("connection timed out".to_owned(), 1)]);
    }
    proxy.set_mode(Mode::Forward);
}

/// `grpc.target` is the canonical target (gRFC A66), not the target as written: a pool built
/// for `127.0.0.2:port` (no scheme: DNS, gRPC's default) labels its per-call and its
/// connection metrics `dns:///127.0.0.2:port`, as gRPC does.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn metrics_name_the_canonical_target() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let server = TestServer::start(loopback(2));
    let written = server.addr().to_string();
    let pool = builder(&written).build().unwrap();
    wait_all_ready(&pool, 1).await;
    client(&pool)
        .unary(echo("canonical"))
        .await
        .expect("call ok");
    pool.close().await.unwrap();

    let canonical = format!("dns:///{written}");
    let mut named = Vec::new();
    for (key, _, _, _) in recorder.snapshotter().snapshot().into_vec() {
        let (_, key) = key.into_parts();
        for label in key.labels().filter(|l| l.key() == "grpc.target") {
            assert_eq!(label.value(), canonical, "{}", key.name());
            named.push(key.name().to_owned());
        }
    }
    for name in [
        "grpc.client.attempt.started",
        "grpc.client.call.duration",
        "grpc.subchannel.connection_attempts_succeeded",
        "grpc.subchannel.open_connections",
    ] {
        assert!(named.iter().any(|n| n == name), "{name} not in {named:?}");
    }
}

/// A request that still streams after its response started (a bidirectional call) is
/// counted whole in `grpc.client.attempt.sent_total_compressed_message_size`: the messages
/// sent after the response headers arrived too, not only those before.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn a_streamed_request_counts_every_message_sent() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use prost::Message as _;

    let recorder = DebuggingRecorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    wait_all_ready(&pool, 1).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first = echo("x");
    let second = echo("a longer second message");
    tx.send(first.clone()).await.unwrap();
    let mut replies = client(&pool)
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("response started")
        .into_inner();
    // The response has started: what follows goes out after it.
    assert_eq!(replies.message().await.unwrap().unwrap().message, "x");
    tx.send(second.clone()).await.unwrap();
    drop(tx);
    let reply = replies.message().await.unwrap().unwrap();
    assert_eq!(reply.message, second.message);
    assert!(replies.message().await.unwrap().is_none());
    drop(replies);
    pool.close().await.unwrap();

    let sent = recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let bidi = key.name() == "grpc.client.attempt.sent_total_compressed_message_size"
                && key
                    .labels()
                    .any(|l| l.key() == "grpc.method" && l.value() == "echo.Echo/Bidi");
            match value {
                DebugValue::Histogram(values) if bidi => {
                    Some(values.iter().map(|v| v.into_inner()).collect::<Vec<_>>())
                }
                _ => None,
            }
        });
    let both = (first.encoded_len() + second.encoded_len()) as f64;
    assert_eq!(sent, Some(vec![both]));
}

/// The per-call samples wait in per-thread batches (`src/metrics/batch.rs`); a pool that
/// makes a few calls and then nothing — no snapshot, no close — still gets them to the
/// recorder: the process's flusher thread (`src/metrics/flusher.rs`) comes within a second
/// of the first sample left behind (sooner if another pool of the process asked first: one
/// round serves all). It is a thread of its own, on the real clock (tokio's paused clock does
/// not reach it): the test's recorder signals every histogram sample it takes, the test
/// waits on that signal (at most 10 s) and checks the samples came well before that. The
/// samples recorded with this thread's local recorder arrive there though another thread
/// flushed them. (That they wait in batches until then is `batch.rs`'s unit tests' to show:
/// here another test's round could flush them early.)
#[cfg(feature = "metrics")]
#[tokio::test]
async fn a_quiet_pool_flushes_its_samples_within_a_second() {
    use metrics_util::debugging::DebugValue;

    const CALLS: usize = 3;
    let (recorder, recorded, snapshotter) = signalling::Signalling::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    wait_all_ready(&pool, 1).await;
    // Durations recorded and attempts started since the last read: the debugging recorder's
    // snapshot takes both.
    let mut durations = 0;
    let read = |durations: &mut usize| {
        let mut started = 0;
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            match (key.key().name(), value) {
                ("grpc.client.attempt.duration", DebugValue::Histogram(values)) => {
                    *durations += values.len();
                }
                ("grpc.client.attempt.started", DebugValue::Counter(n)) => started += n,
                _ => {}
            }
        }
        started
    };

    let first_call = std::time::Instant::now();
    let mut client = client(&pool);
    for i in 0..CALLS {
        client.unary(echo(&format!("{i}"))).await.expect("call ok");
    }
    let mut started = 0;

    // Nothing more happens in the pool: wait for the flusher's samples. (`Notify` keeps a
    // signal given while nobody waits, so none is missed between two reads.)
    let arrival = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            started += read(&mut durations);
            if durations >= CALLS {
                return std::time::Instant::now();
            }
            recorded.notified().await;
        }
    })
    .await;
    assert_eq!(
        durations, CALLS,
        "every attempt's duration, flushed by the flusher thread"
    );
    assert_eq!(
        started, CALLS as u64,
        "every attempt started, flushed with them"
    );
    let arrived = arrival.expect("arrived within 10 s");
    // Within a second of the first sample; the bound leaves room for a stalled machine.
    assert!(
        arrived <= first_call + Duration::from_secs(5),
        "flushed within a second, not only at the end: {:?}",
        arrived - first_call
    );
    pool.close().await.unwrap();
}

/// An attempt that has started and not ended — a bidirectional call kept open — is counted
/// in `grpc.client.attempt.started` within a second, with no end to bring it and no
/// snapshot: a start is a count in its thread's shard (`src/metrics/batch.rs`), and the first
/// count since a flush asks the process's flusher thread to come. The test waits on the
/// recorder's signal (at most 10 s) and checks the call is still open when its start
/// arrives.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn an_attempt_in_flight_is_counted_started_within_a_second() {
    use metrics_util::debugging::DebugValue;

    let (recorder, recorded, snapshotter) = signalling::Signalling::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    wait_all_ready(&pool, 1).await;
    // Starts counted since the last read (the debugging recorder's snapshot takes them).
    let started = || {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find_map(|(key, _, _, value)| {
                let bidi = key.key().name() == "grpc.client.attempt.started"
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "grpc.method" && l.value() == "echo.Echo/Bidi");
                match value {
                    DebugValue::Counter(n) if bidi => Some(n),
                    _ => None,
                }
            })
            .unwrap_or(0)
    };

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(echo("open")).await.unwrap();
    let opened = Instant::now();
    let mut replies = client(&pool)
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("response started")
        .into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().message, "open");
    // The call stays open (its request stream too) while the test waits for its start.
    let mut counted = 0;
    let arrived = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let notified = recorded.notified();
            counted += started();
            if counted >= 1 {
                return Instant::now();
            }
            notified.await;
        }
    })
    .await
    .expect("the start arrived within 10 s, the call still open");
    assert!(
        arrived <= opened + Duration::from_secs(5),
        "counted within a second, not only at the call's end: {:?}",
        arrived - opened
    );
    // Still open: it ends now, and its start is not counted twice.
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
    drop(replies);
    pool.close().await.unwrap();
    counted += started();
    assert_eq!(counted, 1, "one attempt, one start");
}

/// Starts are counted apart from ends (`src/metrics/batch.rs`), and a full batch of ends
/// takes its methods' starts with it: after 64 calls on one thread (a batch's worth, the
/// test's runtime has one thread), the recorder holds at least as many starts as ends, and
/// some ends — whether the batch filled or the flusher thread came first. Afterwards the
/// snapshot's flush brings both to 64.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn a_full_batch_brings_its_starts_with_its_ends() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    const CALLS: u64 = 64;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server])).build().unwrap();
    wait_all_ready(&pool, 1).await;
    // (starts, ends) the recorder took since the last read.
    let read = || {
        let (mut started, mut ended) = (0, 0);
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            match (key.key().name(), value) {
                ("grpc.client.attempt.started", DebugValue::Counter(n)) => started += n,
                ("grpc.client.attempt.duration", DebugValue::Histogram(values)) => {
                    ended += values.len() as u64;
                }
                _ => {}
            }
        }
        (started, ended)
    };
    let mut client = client(&pool);
    for i in 0..CALLS {
        client.unary(echo(&format!("{i}"))).await.expect("call ok");
    }
    let (started, ended) = read();
    assert!(ended > 0, "a full batch, or the flusher, brought ends");
    assert!(
        started >= ended,
        "every end came with its start: {started} starts, {ended} ends"
    );
    pool.snapshot();
    let (more_started, more_ended) = read();
    assert_eq!((started + more_started, ended + more_ended), (CALLS, CALLS));
    pool.close().await.unwrap();
}

/// A recorder that tells when a histogram sample or a counter increment arrives, so that a
/// test can wait for the flusher thread's samples on an event rather than by polling.
#[cfg(feature = "metrics")]
mod signalling {
    use std::sync::Arc;

    use metrics::{
        Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
        SharedString, Unit,
    };
    use metrics_util::debugging::{DebuggingRecorder, Snapshotter};
    use tokio::sync::Notify;

    pub(super) struct Signalling {
        inner: DebuggingRecorder,
        recorded: Arc<Notify>,
    }

    impl Signalling {
        /// A debugging recorder that signals, the signal, and its snapshotter.
        pub(super) fn new() -> (Self, Arc<Notify>, Snapshotter) {
            let recorded = Arc::new(Notify::new());
            let inner = DebuggingRecorder::new();
            let snapshotter = inner.snapshotter();
            let recorder = Self {
                inner,
                recorded: recorded.clone(),
            };
            (recorder, recorded, snapshotter)
        }
    }

    struct SignallingHistogram {
        inner: Histogram,
        recorded: Arc<Notify>,
    }

    struct SignallingCounter {
        inner: Counter,
        recorded: Arc<Notify>,
    }

    impl CounterFn for SignallingCounter {
        fn increment(&self, value: u64) {
            self.inner.increment(value);
            self.recorded.notify_one();
        }

        fn absolute(&self, value: u64) {
            self.inner.absolute(value);
            self.recorded.notify_one();
        }
    }

    impl HistogramFn for SignallingHistogram {
        fn record(&self, value: f64) {
            self.inner.record(value);
            self.recorded.notify_one();
        }
    }

    impl Recorder for Signalling {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
            self.inner.describe_counter(key, unit, description);
        }

        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
            self.inner.describe_gauge(key, unit, description);
        }

        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
            self.inner.describe_histogram(key, unit, description);
        }

        fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
            Counter::from_arc(Arc::new(SignallingCounter {
                inner: self.inner.register_counter(key, metadata),
                recorded: self.recorded.clone(),
            }))
        }

        fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
            self.inner.register_gauge(key, metadata)
        }

        fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(Arc::new(SignallingHistogram {
                inner: self.inner.register_histogram(key, metadata),
                recorded: self.recorded.clone(),
            }))
        }
    }
}

/// The scripted run into the `prometheus` crate's registry through `metrics-prometheus`'s
/// recorder wrapped in [`Underscored`](tonic_pool::metrics::Underscored), with the per-call
/// histograms registered beforehand in gRFC A66's buckets (the setup the metrics module's
/// docs give): every metric the run emits is accepted under its underscored name (the
/// recorder panics on any it rejects), lands in those buckets, and the text exposition
/// counts the calls exactly.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn metrics_reach_a_prometheus_crate_registry_under_underscored_names() {
    use tonic_pool::metrics::{Underscored, LATENCY_BUCKETS, SIZE_BUCKETS};

    let registry = prometheus::Registry::new();
    let recorder = metrics_prometheus::Recorder::builder()
        .with_registry(registry.clone())
        .with_failure_strategy(metrics_prometheus::failure::strategy::Panic)
        .build();
    for (name, buckets) in [
        ("grpc_client_attempt_duration", LATENCY_BUCKETS),
        ("grpc_client_call_duration", LATENCY_BUCKETS),
        (
            "grpc_client_attempt_sent_total_compressed_message_size",
            SIZE_BUCKETS,
        ),
        (
            "grpc_client_attempt_rcvd_total_compressed_message_size",
            SIZE_BUCKETS,
        ),
    ] {
        let opts = prometheus::HistogramOpts::new(name, name).buckets(buckets.to_vec());
        let labels = ["grpc_method", "grpc_target", "grpc_status"];
        recorder
            .try_register_metric(prometheus::HistogramVec::new(opts, &labels).unwrap())
            .unwrap();
    }
    let recorder = Underscored::new(recorder);
    let _local = metrics::set_default_local_recorder(&recorder);

    let (mut server, pool, target) = scripted_pool().await;
    scripted_run(&mut server, &pool).await;
    pool.close().await.unwrap();

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    let ok = format!("grpc_method=\"echo.Echo/Unary\",grpc_status=\"OK\",grpc_target=\"{target}\"");
    for line in [
        format!("grpc_client_call_duration_count{{{ok}}} {OK}"),
        format!("grpc_client_attempt_duration_count{{{ok}}} {OK}"),
        // A66's buckets, not the crate's defaults: 41 latency bounds, the last 100 s.
        format!("grpc_client_call_duration_bucket{{{ok},le=\"100\"}} {OK}"),
        format!("grpc_client_attempt_sent_total_compressed_message_size_bucket{{{ok},le=\"1024\"}} {OK}"),
        format!("grpc_client_attempt_rcvd_total_compressed_message_size_count{{{ok}}} {OK}"),
        format!(
            "grpc_client_attempt_started{{grpc_method=\"echo.Echo/Unary\",grpc_target=\"{target}\"}} {}",
            OK + FAILED + 1
        ),
        format!("grpc_subchannel_connection_attempts_succeeded{{grpc_target=\"{target}\"}} 4"),
        format!(
            "grpc_subchannel_disconnections{{grpc_disconnect_error=\"GOAWAY NO_ERROR\",grpc_target=\"{target}\"}} 2"
        ),
        format!(
            "grpc_subchannel_disconnections{{grpc_disconnect_error=\"subchannel shutdown\",grpc_target=\"{target}\"}} 2"
        ),
        format!("grpc_subchannel_open_connections{{grpc_target=\"{target}\"}} 0"),
        format!("grpc_resolver_resolutions{{grpc_resolver_result=\"ok\",grpc_target=\"{target}\"}} 1"),
        format!("tonic_pool_calls_waiting{{grpc_target=\"{target}\"}} 0"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} not in the exposition:\n{text}"
        );
    }
    let latency_bounds = text
        .lines()
        .filter(|l| l.starts_with(&format!("grpc_client_call_duration_bucket{{{ok},")))
        .count();
    assert_eq!(
        latency_bounds,
        LATENCY_BUCKETS.len() + 1,
        "A66's bounds and +Inf"
    );
}

/// Reading what the debugging recorder holds: `(name, labels, value)` of each metric.
#[cfg(feature = "metrics")]
mod recorded {
    use metrics_util::debugging::DebugValue;

    pub(super) type Recorded = [(String, Vec<(String, String)>, DebugValue)];

    /// The value of the metric `name` whose labels include `labels`.
    fn find<'a>(all: &'a Recorded, name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
        all.iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, value)| value)
    }

    /// A counter's value (0 when it was never registered).
    pub(super) fn counter(all: &Recorded, name: &str, labels: &[(&str, &str)]) -> u64 {
        match find(all, name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            None => 0,
            other => panic!("{name} {labels:?}: {other:?}"),
        }
    }

    pub(super) fn gauge(all: &Recorded, name: &str) -> f64 {
        match find(all, name, &[]) {
            Some(DebugValue::Gauge(g)) => g.into_inner(),
            other => panic!("{name}: {other:?}"),
        }
    }

    /// The values recorded in a per-call histogram of `echo.Echo/Unary` with `status`.
    pub(super) fn histogram(all: &Recorded, name: &str, status: &str) -> Vec<f64> {
        let labels = [("grpc.method", "echo.Echo/Unary"), ("grpc.status", status)];
        match find(all, name, &labels) {
            Some(DebugValue::Histogram(values)) => values.iter().map(|v| v.into_inner()).collect(),
            None => Vec::new(),
            other => panic!("{name} {status}: {other:?}"),
        }
    }
}
