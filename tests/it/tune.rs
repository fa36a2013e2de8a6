//! The tuner (`tonic-pool-tune`, feature `tune`) end to end, with short sweeps: against an
//! L4 balancer over four backends, against one server with a stream limit, its error cases,
//! and the binary itself.

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use support::common::{builder, client, echo, unused_addr, wait_all_ready, WAIT};
use support::echo::EchoRequest;
use support::proxy::TestProxy;
use support::{loopback, ServerOptions, TestServer};
use tonic_pool::tune::{self, Options, TuneError};

/// The response header the test backends name themselves in.
const BACKEND_HEADER: &str = "x-backend";
/// How long each step of a test sweep runs: short, the tests check the rule, not the speed.
const STEP: Duration = Duration::from_millis(250);

/// An encoded `echo.EchoRequest`, as a user would pass with `--request-hex`.
fn request(message: &str, sleep_ms: u32) -> Bytes {
    EchoRequest {
        message: message.to_owned(),
        sleep_ms,
        payload: Vec::new(),
    }
    .encode_to_vec()
    .into()
}

/// Options for a short sweep of `echo.Echo/Unary` on `target`, N up to 8.
fn options(target: &str, concurrency: usize) -> Options {
    let mut options = Options::new(target);
    options.method = "/echo.Echo/Unary".to_owned();
    options.request = request("tune", 2);
    options.max_connections = 8;
    options.concurrency = concurrency;
    options.step_duration = STEP;
    options
}

/// Behind a round-robin L4 balancer with four backends, the recommended N reaches every
/// backend evenly: a pool of that N, checked apart from the sweep, gives each backend at
/// least 0.8 of its fair share of calls. (N = 1 or 2 would leave backends idle, N = 3, 5, 6
/// or 7 would load them unevenly, whatever the throughput says.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommended_n_spreads_calls_over_every_backend_behind_an_l4_balancer() {
    let backends: Vec<TestServer> = (0..4)
        .map(|i| {
            TestServer::start_with(
                loopback(1),
                ServerOptions {
                    name: format!("backend-{i}"),
                    name_header: Some(BACKEND_HEADER.to_owned()),
                    ..ServerOptions::default()
                },
            )
        })
        .collect();
    let addrs: Vec<_> = backends.iter().map(TestServer::addr).collect();
    let balancer = TestProxy::try_start_round_robin(loopback(1), &addrs).unwrap();
    let target = format!("static:///{}", balancer.addr());

    let mut options = options(&target, 16);
    options.backend_header = Some(BACKEND_HEADER.parse().unwrap());
    let report = tune::run(&options, &mut std::io::sink()).await.unwrap();
    assert_eq!(report.backends.len(), 4, "{}", report.table());
    let n = report.recommended;

    let pool = builder(&target)
        .connections_per_endpoint(n)
        .build()
        .unwrap();
    wait_all_ready(&pool, n).await;
    let before: Vec<u64> = backends.iter().map(TestServer::requests).collect();
    let mut client = client(&pool);
    const CALLS: u64 = 400;
    for i in 0..CALLS {
        client.unary(echo(&format!("check-{i}"))).await.unwrap();
    }
    let fair = CALLS as f64 / backends.len() as f64;
    for (backend, before) in backends.iter().zip(before) {
        let calls = backend.requests() - before;
        assert!(
            calls as f64 >= 0.8 * fair,
            "N = {n}: {} took {calls} of {CALLS} calls\n{}",
            backend.name(),
            report.table()
        );
    }
    pool.close().await.unwrap();
}

/// Against one server allowing 8 streams per connection, with 32 calls in flight, the knee
/// lands where the limit stops binding: N = 4 connections carry all 32 calls, fewer queue
/// (N = 2 has half the req/s of N = 4, N = 3 three quarters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knee_lands_where_the_stream_limit_stops_binding() {
    let server = TestServer::start_with(
        loopback(1),
        ServerOptions {
            max_concurrent_streams: Some(8),
            ..ServerOptions::default()
        },
    );
    let mut options = options(&format!("static:///{}", server.addr()), 32);
    // Calls long enough that the stream limit, not the test machine's CPU, sets the pace: a
    // busy machine adds milliseconds to each call, not a factor to the calls in flight.
    options.request = request("limited", 100);
    options.step_duration = Duration::from_millis(300);
    let report = tune::run(&options, &mut std::io::sink()).await.unwrap();
    assert!(
        (4..=8).contains(&report.recommended),
        "recommended {}\n{}",
        report.recommended,
        report.table()
    );
}

/// A method the server does not serve stops the sweep at once with "method not found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_method_is_a_clear_error() {
    let server = TestServer::start(loopback(1));
    let mut options = options(&format!("static:///{}", server.addr()), 4);
    options.method = "/echo.Echo/NoSuchMethod".to_owned();
    let err = tune::run(&options, &mut std::io::sink()).await.unwrap_err();
    assert!(matches!(err, TuneError::Unimplemented { .. }), "{err:?}");
    assert!(err.to_string().starts_with("method not found"), "{err}");
}

/// A server refusing the credentials (UNAUTHENTICATED) stops the sweep as an auth failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_is_an_auth_failure() {
    let server = TestServer::start(loopback(1));
    let mut options = options(&format!("static:///{}", server.addr()), 4);
    // The echo server answers `status:16` with UNAUTHENTICATED.
    options.request = request("status:16", 0);
    let err = tune::run(&options, &mut std::io::sink()).await.unwrap_err();
    assert!(matches!(err, TuneError::Unauthenticated { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("authentication failed"),
        "{err}"
    );
}

/// A target nothing listens on is a connect error carrying the pool's last error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_is_a_connect_error() {
    let target = format!("static:///{}", unused_addr(1));
    let err = tune::run(&options(&target, 4), &mut std::io::sink())
        .await
        .unwrap_err();
    let TuneError::Connect { last_error, .. } = &err else {
        panic!("expected a connect error, got {err:?}");
    };
    assert!(!last_error.starts_with("not Ready"), "{last_error}");
    assert!(err.to_string().starts_with("connect error"), "{err}");
}

/// Runs the binary with `args`, at most `WAIT`; returns its exit code, stdout and stderr.
fn run_binary(args: &[&str]) -> (Option<i32>, String, String) {
    // Waits on the process's exit, bounded by WAIT: on timeout the future is dropped and
    // `kill_on_drop` ends the process.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let output = runtime.block_on(async {
        let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_tonic-pool-tune"))
            .args(args)
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(WAIT, run).await
    });
    match output {
        Ok(output) => {
            let output = output.expect("run tonic-pool-tune");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
        Err(_) => (
            None,
            String::new(),
            format!("tonic-pool-tune ran past {WAIT:?}"),
        ),
    }
}

/// The binary runs a sweep, writes the plot, and ends its output with the builder line and,
/// last, exactly `recommended connections_per_endpoint: N`.
#[test]
fn binary_ends_with_the_recommendation() {
    let server = TestServer::start(loopback(1));
    let target = format!("static:///{}", server.addr());
    let plot = std::env::temp_dir().join(format!("tonic-pool-tune-{}.svg", std::process::id()));
    let hex: String = request("bin", 0)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (code, stdout, stderr) = run_binary(&[
        &target,
        "--method",
        "/echo.Echo/Unary",
        "--request-hex",
        &hex,
        "--metadata",
        "x-tenant=test",
        "--max-connections",
        "2",
        "--concurrency",
        "4",
        "--step-duration",
        "100ms",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    let n = last
        .strip_prefix("recommended connections_per_endpoint: ")
        .and_then(|n| n.parse::<usize>().ok());
    assert!(matches!(n, Some(1 | 2)), "last line {last:?}\n{stdout}");
    let builder_line = lines[lines.len() - 2];
    assert!(
        builder_line.starts_with("builder: Pool::builder(")
            && builder_line.contains(&format!(".connections_per_endpoint({})", n.unwrap())),
        "{builder_line}"
    );
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    let _ = std::fs::remove_file(&plot);
    assert!(svg.starts_with("<svg "), "{svg}");
}

/// Bad hex in `--request-hex` is a usage error naming the option (exit code 2), not a panic.
#[test]
fn binary_rejects_bad_hex() {
    let (code, stdout, stderr) = run_binary(&["static:///127.0.0.1:1", "--request-hex", "0g"]);
    assert_eq!(code, Some(2), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.starts_with("tonic-pool-tune: --request-hex: 'g' is not a hex digit"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
