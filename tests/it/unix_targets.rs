//! gRPC's `unix:` and `unix-abstract:` targets over real Unix domain sockets: calls, the
//! address in states and snapshots, `:authority`, recovery when the server comes back, a
//! relative path, and bad input.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use tonic_pool::{ConnectivityState, EndpointAddr, Pool, Scope, TargetError};

use crate::support::common::{builder, client, echo, WAIT};
use crate::support::{UnixListen, UnixServer};

/// A directory of its own under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tonic-pool-unix-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        TempDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("echo.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A unique abstract socket name for this test process.
#[cfg(target_os = "linux")]
fn abstract_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "tonic-pool-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Calls a few times; every call must succeed, and the server must see `localhost` as
/// `:authority`.
async fn calls_succeed(pool: &Pool) {
    let mut client = client(pool);
    for i in 0..5 {
        let reply = client
            .unary(echo(&format!("unix {i}")))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"))
            .into_inner();
        assert_eq!(reply.message, format!("unix {i}"));
    }
    let authority = client.unary(echo("authority?")).await.expect("authority?");
    assert_eq!(authority.into_inner().message, "localhost");
}

/// Waits until the pool is Ready with `connections` Ready connections.
async fn wait_ready(pool: &Pool, connections: usize) {
    let ready = pool
        .wait_until(WAIT, |s| {
            s.state == ConnectivityState::Ready && s.ready_connections() == connections
        })
        .await;
    assert!(ready, "never Ready: {}", pool.snapshot());
}

/// A `unix:/abs/path` target connects its connections over the socket file; calls work and
/// carry `:authority` `localhost`; the snapshot and the endpoint events name the Unix address
/// (`unix:/…`), never a TCP one.
#[tokio::test]
async fn calls_over_an_absolute_unix_path() {
    let dir = TempDir::new();
    let path = dir.socket();
    let server = UnixServer::start(UnixListen::Path(path.clone())).expect("unix server");
    let pool = builder(&format!("unix:{}", path.display()))
        .connections_per_endpoint(2)
        .build()
        .expect("pool");
    let mut events = pool.events();
    wait_ready(&pool, 2).await;
    calls_succeed(&pool).await;
    assert!(server.requests() >= 6);

    let snapshot = pool.snapshot();
    let expected = EndpointAddr::unix(&path);
    assert_eq!(snapshot.endpoints.len(), 1, "{snapshot}");
    assert_eq!(snapshot.endpoints[0].addr, expected);
    assert_eq!(
        snapshot.endpoints[0].addr.to_string(),
        format!("unix:{}", path.display())
    );
    assert!(snapshot.endpoint(expected.clone()).is_some());
    assert!(
        snapshot.to_string().contains(&expected.to_string()),
        "{snapshot}"
    );

    let mut saw_endpoint_event = false;
    while let Ok(event) = events.try_recv() {
        if let Scope::Endpoint(addr) | Scope::Connection { addr, .. } = &event.scope {
            assert_eq!(*addr, expected, "{event:?}");
            saw_endpoint_event = true;
        }
    }
    assert!(saw_endpoint_event, "no endpoint or connection event");
}

/// `unix:///abs/path` (three slashes) is the same socket as `unix:/abs/path`.
#[tokio::test]
async fn calls_over_a_three_slash_unix_target() {
    let dir = TempDir::new();
    let path = dir.socket();
    let _server = UnixServer::start(UnixListen::Path(path.clone())).expect("unix server");
    let pool = builder(&format!("unix://{}", path.display()))
        .build()
        .expect("pool");
    wait_ready(&pool, 1).await;
    calls_succeed(&pool).await;
    assert_eq!(pool.snapshot().endpoints[0].addr, EndpointAddr::unix(&path));
}

/// A relative `unix:` path is taken relative to the working directory (tests do not change
/// it: the relative path is computed from it to the temporary directory).
#[tokio::test]
async fn calls_over_a_relative_unix_path() {
    let dir = TempDir::new();
    let path = dir.socket();
    let _server = UnixServer::start(UnixListen::Path(path.clone())).expect("unix server");
    let relative = relative_to_cwd(&path);
    assert!(relative.is_relative());
    let pool = builder(&format!("unix:{}", relative.display()))
        .build()
        .expect("pool");
    wait_ready(&pool, 1).await;
    calls_succeed(&pool).await;
    assert_eq!(
        pool.snapshot().endpoints[0].addr,
        EndpointAddr::unix(&relative)
    );
}

/// `path` (absolute) as a path relative to the working directory: up to the root, then down.
fn relative_to_cwd(path: &Path) -> PathBuf {
    let cwd = std::env::current_dir().expect("cwd");
    let ups = cwd.components().count() - 1;
    let mut relative: PathBuf = std::iter::repeat_n("..", ups).collect();
    relative.push(path.strip_prefix("/").expect("absolute"));
    relative
}

/// `unix-abstract:name` connects to the name in Linux's abstract namespace (no file).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn calls_over_an_abstract_unix_socket() {
    let name = abstract_name();
    let _server = UnixServer::start(UnixListen::Abstract(name.clone().into_bytes()))
        .expect("abstract unix server");
    let pool = builder(&format!("unix-abstract:{name}"))
        .connections_per_endpoint(2)
        .build()
        .expect("pool");
    wait_ready(&pool, 2).await;
    calls_succeed(&pool).await;
    let snapshot = pool.snapshot();
    assert_eq!(
        snapshot.endpoints[0].addr,
        EndpointAddr::unix_abstract(&name)
    );
    assert_eq!(
        snapshot.endpoints[0].addr.to_string(),
        format!("unix-abstract:{name}")
    );
}

/// When the server goes away (its socket file removed), the pool goes TransientFailure with
/// the connect error; when it comes back on the same path, the pool reconnects by itself and
/// calls work again.
#[tokio::test]
async fn recovers_when_the_unix_server_comes_back() {
    let dir = TempDir::new();
    let path = dir.socket();
    let mut server = UnixServer::start(UnixListen::Path(path.clone())).expect("unix server");
    let pool = builder(&format!("unix:{}", path.display()))
        .build()
        .expect("pool");
    wait_ready(&pool, 1).await;
    calls_succeed(&pool).await;

    server.stop();
    let failed = pool
        .wait_until(WAIT, |s| s.state == ConnectivityState::TransientFailure)
        .await;
    assert!(failed, "never TransientFailure: {}", pool.snapshot());

    server.restart().expect("restart");
    wait_ready(&pool, 1).await;
    calls_succeed(&pool).await;
}

/// A path where no socket exists is not a build error (the socket may come later) nor a
/// panic: the pool is TransientFailure, its last error names the address and the cause, and
/// a call fails with UNAVAILABLE.
#[tokio::test]
async fn a_missing_socket_is_a_transient_failure_with_a_clear_error() {
    let dir = TempDir::new();
    let path = dir.socket();
    let pool = builder(&format!("unix:{}", path.display()))
        .build()
        .expect("pool");
    let failed = pool
        .wait_until(WAIT, |s| s.state == ConnectivityState::TransientFailure)
        .await;
    assert!(failed, "never TransientFailure: {}", pool.snapshot());
    let snapshot = pool.snapshot();
    let error = snapshot.last_error.clone().expect("a last error");
    assert!(
        error.contains(&format!("unix:{}", path.display())),
        "the error names the address: {error}"
    );
    assert!(
        error.to_lowercase().contains("no such file"),
        "the error names the cause: {error}"
    );
    let status = client(&pool)
        .unary(echo("nobody"))
        .await
        .expect_err("no server");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
}

/// TLS wraps a Unix socket as it wraps TCP, and verifies the certificate against
/// `localhost`, the host of a Unix target: a certificate for `localhost` is trusted (and
/// requests carry `:authority` `localhost`), one for another name is refused.
#[cfg(feature = "tls")]
#[tokio::test]
async fn tls_over_a_unix_socket_verifies_localhost() {
    use crate::support::tls::TestCa;
    let ca = TestCa::new("unix test CA");
    for (name, trusted) in [("localhost", true), ("elsewhere.test", false)] {
        let dir = TempDir::new();
        let path = dir.socket();
        let _server = UnixServer::start_tls(
            UnixListen::Path(path.clone()),
            Some(ca.issue(&[name]).server_tls()),
        )
        .expect("TLS unix server");
        let pool = builder(&format!("unix:{}", path.display()))
            .tls(crate::tls::trusting(&ca))
            .build()
            .expect("pool");
        if trusted {
            wait_ready(&pool, 1).await;
            calls_succeed(&pool).await;
        } else {
            let failed = pool
                .wait_until(WAIT, |s| s.state == ConnectivityState::TransientFailure)
                .await;
            assert!(
                failed,
                "{name}: never TransientFailure: {}",
                pool.snapshot()
            );
            let error = pool.snapshot().last_error.unwrap_or_default();
            assert!(error.contains("certificate"), "{name}: {error}");
        }
    }
}

/// Malformed Unix targets are typed errors from `build()` that name the problem.
#[tokio::test]
async fn malformed_unix_targets_are_typed_errors() {
    for target in ["unix:", "unix://", "unix://host/sock", "unix-abstract:"] {
        let err = Pool::builder(target).build().unwrap_err();
        assert!(err.is_invalid_target(), "{target:?}: {err}");
        assert_eq!(
            err.target_error(),
            Some(&TargetError::InvalidUnixPath(target.to_owned())),
            "{target:?}"
        );
        assert!(err.to_string().contains("names no Unix socket"), "{err}");
    }
}
