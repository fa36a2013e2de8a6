//! Shutdown: close() drains calls and reports every failure; dropping the last handle ends
//! every task of the pool.

use crate::support;

use std::time::Duration;

use support::common::{builder, client, echo, slow_echo, static_target, wait_all_ready, WAIT};
use support::{loopback, ServerOptions, TestServer};
use tonic::Code;
use tonic_pool::{ConnectivityState, Pool};

/// close() with calls in flight: they complete; calls made afterwards fail at once with the
/// shutdown error (UNAVAILABLE), and close() returns Ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lets_calls_in_flight_finish() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server]))
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let mut client = client(&pool);
            tokio::spawn(async move { client.unary(slow_echo(&i.to_string(), 300)).await })
        })
        .collect();
    assert!(server.wait_for_requests(5, WAIT).await);

    let closing = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.close().await })
    };
    // New calls fail as soon as close() has started.
    assert!(
        pool.watch()
            .wait_for(ConnectivityState::Shutdown, WAIT)
            .await
    );
    let status = client(&pool).unary(echo("late")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("shut down"), "{status:?}");

    for call in calls {
        call.await.unwrap().expect("in-flight call completed");
    }
    closing.await.unwrap().expect("clean close");
    assert!(
        server.wait_for_open_connections(0, WAIT).await,
        "connections closed"
    );
    // Closing again is harmless.
    pool.close().await.unwrap();
}

/// Calls still running at the close timeout are cut, and close() reports them.
#[tokio::test]
async fn close_reports_calls_cut_by_the_timeout() {
    let server = TestServer::start(loopback(2));
    let pool = builder(&static_target(&[&server]))
        .close_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let mut client = client(&pool);
    let call = tokio::spawn(async move { client.unary(slow_echo("slow", 5_000)).await });
    assert!(server.wait_for_requests(1, WAIT).await);
    let err = pool.close().await.unwrap_err();
    assert!(err.is_close());
    assert_eq!(err.failures().len(), 1, "{err}");
    assert!(
        err.to_string().contains("1 call(s) still in flight"),
        "{err}"
    );
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// A connection retired after a GOAWAY stays the pool's until it ends: a call still running
/// on it is cut by close() like any other (it used to be detached and run on after close()
/// said it had cut everything), and close() reports it.
#[tokio::test]
async fn close_cuts_calls_on_connections_retired_by_goaway() {
    let server = TestServer::start_with(
        loopback(2),
        ServerOptions {
            // GOAWAY after 300 ms, then wait for the connection's calls however long they run.
            max_connection_age: Some(Duration::from_millis(300)),
            ..ServerOptions::default()
        },
    );
    let pool = builder(&static_target(&[&server]))
        .close_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let mut slow = client(&pool);
    let call = tokio::spawn(async move { slow.unary(slow_echo("slow", 60_000)).await });
    assert!(server.wait_for_requests(1, WAIT).await);
    // The GOAWAY retires the first connection; the pool opens a second one.
    assert!(server.wait_for_accepted(2, WAIT).await);
    wait_all_ready(&pool, 1).await;
    let err = pool.close().await.unwrap_err();
    assert!(
        err.to_string().contains("1 call(s) still in flight"),
        "{err}"
    );
    let status = tokio::time::timeout(WAIT, call)
        .await
        .expect("the call on the retired connection was cut")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        server.wait_for_open_connections(0, WAIT).await,
        "every connection closed"
    );
}

/// Dropping the last handle ends the worker and every connection task: the pool's runtime
/// goes back to zero live tasks and the server sees its connections close.
#[test]
fn dropping_the_last_handle_ends_every_task() {
    let server = TestServer::start(loopback(2));
    // The pool gets a runtime of its own so its tasks can be counted.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let metrics = tokio::runtime::Handle::current().metrics();
        assert_eq!(metrics.num_alive_tasks(), 0);
        let pool = builder(&static_target(&[&server]))
            .connections_per_endpoint(3)
            .build()
            .unwrap();
        wait_all_ready(&pool, 3).await;
        let clone = pool.clone();
        client(&clone).unary(echo("x")).await.unwrap();
        assert!(
            metrics.num_alive_tasks() >= 4,
            "worker + 3 slots + their connection drivers"
        );
        drop(pool);
        assert!(
            metrics.num_alive_tasks() >= 4,
            "a clone keeps the pool alive"
        );
        let mut state = clone.watch();
        drop(clone);
        // Events first: the worker declares the pool shut down, the server sees every
        // connection close.
        assert!(state.wait_for(ConnectivityState::Shutdown, WAIT).await);
        assert!(server.wait_for_open_connections(0, WAIT).await);
        // Then the tasks finish within a few turns of this runtime (bounded; no sleeping).
        let mut turns = 0;
        while metrics.num_alive_tasks() > 0 && turns < 1_000 {
            tokio::task::yield_now().await;
            turns += 1;
        }
        assert_eq!(
            metrics.num_alive_tasks(),
            0,
            "tasks left after {turns} turns"
        );
    });
}

/// close() returns only once every task the pool started has ended: right after it returns,
/// the runtime's alive tasks are back to their number before the pool was built.
///
/// A current-thread runtime on purpose: tokio wakes a task's `JoinHandle` (and runs whatever
/// the task's last act woke) before it takes the finished task out of `num_alive_tasks`
/// (`Harness::complete`: `wake_join`, then `release`), so on a multi-thread runtime the count
/// read right after `close()` can lag by a task that has already finished everything it does
/// — a race in the measurement, not in the pool. On one thread a task's completion, release
/// included, happens before anything it woke runs, so the count is exact.
#[tokio::test(flavor = "current_thread")]
async fn close_returns_after_every_connection_task_ended() {
    let a = TestServer::start(loopback(2));
    let b = TestServer::start(loopback(3));
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let pool = builder(&static_target(&[&a, &b]))
        .connections_per_endpoint(3)
        .build()
        .unwrap();
    wait_all_ready(&pool, 6).await;
    let mut grpc = client(&pool);
    for i in 0..6 {
        grpc.unary(echo(&i.to_string())).await.unwrap();
    }
    drop(grpc);

    pool.close().await.expect("clean close");
    let closed = tokio::time::Instant::now();
    let tasks_after_close = metrics.num_alive_tasks();
    // For the message only: how long the pool's last tasks outlive close() (nothing signals a
    // task's end, so look every millisecond, for at most WAIT).
    while metrics.num_alive_tasks() > tasks_before && closed.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        tasks_after_close,
        tasks_before,
        "close() returned with {} task(s) of the pool still alive; {} remain {:?} later",
        tasks_after_close - tasks_before,
        metrics.num_alive_tasks() - tasks_before,
        closed.elapsed(),
    );
}

/// A call waiting for a connection when the pool closes fails with the shutdown error
/// instead of hanging.
#[tokio::test]
async fn waiting_call_fails_when_the_pool_closes() {
    let addr = support::common::unused_addr(2);
    let pool = builder(&format!("static:///{addr}")).build().unwrap();
    let mut client = client(&pool);
    let mut request = tonic::Request::new(echo("x"));
    request
        .extensions_mut()
        .insert(tonic_pool::WaitForReady(true));
    let call = tokio::spawn(async move { client.unary(request).await });
    pool.close().await.unwrap();
    let status = tokio::time::timeout(WAIT, call)
        .await
        .expect("does not hang")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shut down"), "{status:?}");
}

/// Building a pool outside a runtime, or with bad settings, is an error, never a panic.
#[test]
fn build_errors_are_errors() {
    let err = Pool::builder("static:///127.0.0.1:1").build().unwrap_err();
    assert!(err.is_no_runtime(), "{err}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let err = Pool::builder("static:///127.0.0.1:1")
        .runtime(runtime.handle().clone())
        .connections_per_endpoint(0)
        .build()
        .unwrap_err();
    assert!(err.is_invalid_config(), "{err}");
    // With the `tls` feature an `https://` target uses TLS (see `tls.rs`); without it, there
    // is no TLS to use.
    if !cfg!(feature = "tls") {
        let err = Pool::builder("https://127.0.0.1:1")
            .runtime(runtime.handle().clone())
            .build()
            .unwrap_err();
        assert!(
            err.is_invalid_config() && err.to_string().contains("feature `tls`"),
            "{err}"
        );
    }
    let err = Pool::builder("static:///127.0.0.1:1")
        .runtime(runtime.handle().clone())
        .user_agent("bad\nagent")
        .build()
        .unwrap_err();
    assert!(
        err.is_invalid_config() && err.to_string().contains("user_agent"),
        "{err}"
    );
    let err = Pool::builder("static:///127.0.0.1:1")
        .runtime(runtime.handle().clone())
        .resolve_ttl_bounds(Duration::from_secs(10), Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert!(err.is_invalid_config(), "{err}");
    let pool = Pool::builder("static:///127.0.0.1:1")
        .runtime(runtime.handle().clone())
        .build()
        .expect("a runtime handle is enough");
    drop(pool);
}
