//! Open discovery: resolvers of the user's own that own a scheme (`k8s:///ns/svc`), and
//! addresses pushed by a caller that has its own discovery stream (`resolve::Push`), over real
//! tonic servers on 127.0.0.x.

use crate::support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use support::common::{builder, client, echo, wait_all_ready, wait_endpoint, WAIT};
use support::echo::EchoRequest;
use support::{loopback, TestServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_pool::resolve::{BoxFuture, Push, Resolution, Resolve, ResolveError};
use tonic_pool::target::TargetKind;
use tonic_pool::{ConnectivityState, Pool, Target, TargetError, WaitForReady};

/// A service directory of the test's own: `namespace/name` → addresses, for `k8s:` targets.
#[derive(Debug, Default)]
struct Directory(HashMap<String, Vec<SocketAddr>>);

impl Resolve for Directory {
    fn resolve(&self, target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        let answer = match target.kind() {
            TargetKind::Custom {
                scheme, endpoint, ..
            } if scheme == "k8s" => self
                .0
                .get(endpoint)
                .map(|addrs| Resolution::new(addrs.iter().copied(), None))
                .ok_or_else(|| ResolveError::new(format!("no service {endpoint}"))),
            _ => Err(ResolveError::new(format!("{target} is not a k8s target"))),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// A resolver of the test's own claims the `k8s` scheme: `k8s:///ns/echo` parses, goes to it
/// (not to DNS), and the pool connects to every address it returns and sends calls to each;
/// the endpoint `ns/echo` is not a host, so the `:authority` is `localhost`.
#[tokio::test]
async fn a_resolver_of_your_own_owns_its_scheme() {
    let servers = [
        TestServer::start(loopback(80)),
        TestServer::start(loopback(81)),
    ];
    let directory = Directory(HashMap::from([(
        "ns/echo".to_owned(),
        servers.iter().map(TestServer::addr).collect(),
    )]));
    let pool = builder("k8s:///ns/echo")
        .resolver_for_scheme("k8s", directory)
        .build()
        .expect("the k8s scheme is registered");
    assert!(matches!(
        pool.target().kind(),
        TargetKind::Custom { scheme, endpoint, .. } if scheme == "k8s" && endpoint == "ns/echo"
    ));
    wait_all_ready(&pool, 2).await;
    let mut client = client(&pool);
    for _ in 0..4 {
        client.unary(echo("hello")).await.expect("call");
    }
    for server in &servers {
        assert!(server.requests() >= 1, "{} got no call", server.addr());
    }
    let authority = client.unary(echo("authority?")).await.expect("call");
    assert_eq!(authority.into_inner().message, "localhost");
    pool.close().await.expect("clean close");
}

/// A directory whose answer the test changes.
#[derive(Debug, Default, Clone)]
struct Changing(Arc<Mutex<Vec<SocketAddr>>>);

impl Resolve for Changing {
    fn resolve(&self, _target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        let addrs = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Box::pin(std::future::ready(Ok(Resolution::new(addrs, None))))
    }
}

/// A custom target is resolved again as a DNS name is (when its answer's time is up): an
/// address the resolver starts returning gets connections, one it stops returning drains.
#[tokio::test]
async fn a_custom_target_is_resolved_again() {
    let s1 = TestServer::start(loopback(90));
    let s2 = TestServer::start(loopback(91));
    let directory = Changing::default();
    directory.0.lock().unwrap().push(s1.addr());
    let pool = builder("consul:///echo")
        .resolver_for_scheme("consul", directory.clone())
        .resolve_ttl_bounds(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .expect("valid pool");
    wait_all_ready(&pool, 1).await;
    *directory.0.lock().unwrap() = vec![s2.addr()];
    wait_endpoint(&pool, s2.addr(), ConnectivityState::Ready).await;
    assert!(
        pool.wait_until(WAIT, |s| s.endpoint(s1.addr()).is_none_or(|e| e.draining))
            .await,
        "{:#?}",
        pool.snapshot()
    );
    // `echo` is a host name: it is the `:authority`.
    let reply = client(&pool).unary(echo("authority?")).await.expect("call");
    assert_eq!(reply.into_inner().message, "echo");
    pool.close().await.expect("clean close");
}

/// Without a registered resolver a custom scheme stays an unknown-scheme error (gRPC's Unix
/// socket schemes are built in: `unix_targets`); a built-in scheme or a malformed one
/// cannot be registered; a registered scheme's target without an
/// endpoint is a typed error; and discovery cannot be combined with a resolver.
#[tokio::test]
async fn custom_schemes_and_discovery_reject_bad_input() {
    let err = Pool::builder("k8s:///ns/echo").build().unwrap_err();
    assert_eq!(
        err.target_error(),
        Some(&TargetError::UnknownScheme("k8s".into()))
    );
    assert!(err.to_string().contains("resolver_for_scheme"), "{err}");

    for scheme in ["dns", "HTTPS", "unix", "1k8s", "k 8s", ""] {
        let err = Pool::builder("dns:///localhost:1")
            .resolver_for_scheme(scheme, Directory::default())
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains("resolver_for_scheme"),
            "{scheme:?}: {err}"
        );
    }

    let err = Pool::builder("k8s://")
        .resolver_for_scheme("k8s", Directory::default())
        .build()
        .unwrap_err();
    assert_eq!(
        err.target_error(),
        Some(&TargetError::MissingEndpoint("k8s://".into()))
    );

    let err = Pool::builder("svc:1")
        .discovery(Push::new())
        .resolver(Directory::default())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("discovery"), "{err}");
}

/// Pushed addresses: a pool with no address yet is Connecting and never resolves its target
/// (`push.test` does not exist); an inserted address gets its connections and calls; a second
/// one too, with calls on both.
#[tokio::test]
async fn pushed_addresses_get_connections_and_calls() {
    let s1 = TestServer::start(loopback(82));
    let s2 = TestServer::start(loopback(83));
    let push = Push::new();
    let pool = builder("push.test:443")
        .connections_per_endpoint(2)
        .discovery(push.clone())
        .build()
        .expect("valid pool");
    assert!(
        pool.wait_until(WAIT, |s| s.state == ConnectivityState::Connecting)
            .await
    );
    assert!(pool.snapshot().endpoints.is_empty());

    assert!(push.insert(s1.addr()));
    wait_all_ready(&pool, 2).await;
    let mut client = client(&pool);
    client.unary(echo("one")).await.expect("call to s1");
    assert_eq!(s1.requests(), 1);

    assert!(push.insert(s2.addr()));
    wait_all_ready(&pool, 4).await;
    for _ in 0..4 {
        client.unary(echo("both")).await.expect("call");
    }
    assert!(s2.requests() >= 1, "the new address gets calls");
    let snapshot = pool.snapshot();
    assert_eq!(snapshot.resolve_errors, 0, "nothing was resolved");
    pool.close().await.expect("clean close");
}

/// A removed address drains exactly as one a resolver dropped: its call in flight (a
/// bidirectional stream) keeps working and completes, and new calls go to the address that
/// stays.
#[tokio::test]
async fn a_removed_address_drains_with_its_call_in_flight() {
    let s1 = TestServer::start(loopback(84));
    let s2 = TestServer::start(loopback(85));
    let push = Push::new();
    push.insert(s1.addr());
    let pool = builder("push.test:443")
        .discovery(push.clone())
        .build()
        .expect("valid pool");
    wait_all_ready(&pool, 1).await;

    // A bidirectional stream on s1, the only address.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(4);
    let mut stream = client(&pool)
        .bidi(ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    tx.send(echo("before")).await.expect("send");
    let reply = stream.message().await.expect("reply").expect("one");
    assert_eq!(reply.message, "before");

    push.replace([s2.addr()]);
    assert!(
        pool.wait_until(WAIT, |s| s.endpoint(s1.addr()).is_some_and(
            |e| e.draining && e.connections.iter().map(|c| c.in_flight).sum::<usize>() == 1
        ))
        .await,
        "s1 drains with its call: {:#?}",
        pool.snapshot()
    );
    wait_endpoint(&pool, s2.addr(), ConnectivityState::Ready).await;
    client(&pool).unary(echo("new")).await.expect("new call");
    assert_eq!(s2.requests(), 1, "new calls go to s2");

    // The call in flight on the draining connection still works, and completes.
    tx.send(echo("after")).await.expect("send");
    let reply = stream.message().await.expect("reply").expect("one");
    assert_eq!(reply.message, "after");
    drop(tx);
    assert!(stream.message().await.expect("clean end").is_none());
    // Its connection then has nothing left to wait for, and closes (GOAWAY, then the socket)
    // even though the caller still holds the ended stream: an ended response keeps no h2
    // stream of the connection. Well before the driver's 5 s bound on a closing connection
    // that still has streams, which is what a held stream used to cost.
    assert!(
        s1.wait_for_open_connections(0, Duration::from_secs(3))
            .await,
        "the drained connection closed while its ended stream is still held: {:#?}",
        pool.snapshot()
    );
    drop(stream);
    pool.close().await.expect("clean close");
}

/// Dropping every `Push` handle changes nothing: the pool keeps the last set (both
/// endpoints, Ready, not draining) and its calls keep working.
#[tokio::test]
async fn dropping_the_handle_keeps_the_last_set() {
    let s1 = TestServer::start(loopback(86));
    let s2 = TestServer::start(loopback(87));
    let push = Push::new();
    push.replace([s1.addr(), s2.addr()]);
    let pool = builder("push.test:443")
        .discovery(push.clone())
        .build()
        .expect("valid pool");
    wait_all_ready(&pool, 2).await;
    let mut events = pool.events();
    drop(push);
    let mut client = client(&pool);
    for _ in 0..4 {
        client.unary(echo("still")).await.expect("call");
    }
    let snapshot = pool.snapshot();
    assert_eq!(snapshot.state, ConnectivityState::Ready);
    assert_eq!(snapshot.endpoints.len(), 2);
    assert!(snapshot.endpoints.iter().all(|e| !e.draining));
    assert!(s1.requests() >= 1 && s2.requests() >= 1);
    assert!(
        events.try_recv().is_err(),
        "no state changed when the handle went away"
    );
    pool.close().await.expect("clean close");
}

/// Removing the last address is not a failed lookup: the address drains and the pool is
/// TransientFailure (no resolution error counted); calls fail fast with UNAVAILABLE, a
/// wait-for-ready call waits, and it completes once an address is pushed again.
#[tokio::test]
async fn removing_every_address_is_transient_failure_until_one_comes() {
    let s1 = TestServer::start(loopback(88));
    let push = Push::new();
    push.insert(s1.addr());
    let pool = builder("push.test:443")
        .discovery(push.clone())
        .build()
        .expect("valid pool");
    wait_all_ready(&pool, 1).await;

    assert!(push.remove(s1.addr()));
    assert!(
        pool.wait_until(WAIT, |s| s.state == ConnectivityState::TransientFailure)
            .await,
        "{:#?}",
        pool.snapshot()
    );
    let snapshot = pool.snapshot();
    assert_eq!(
        snapshot.resolve_errors, 0,
        "an explicit removal is not an error"
    );
    assert!(snapshot.endpoints.iter().all(|e| e.draining));

    let status = client(&pool)
        .unary(echo("fail fast"))
        .await
        .expect_err("no address");
    assert_eq!(status.code(), Code::Unavailable);

    let waiting = {
        let mut client = client(&pool);
        tokio::spawn(async move {
            let mut request = tonic::Request::new(echo("waits"));
            request.extensions_mut().insert(WaitForReady(true));
            client.unary(request).await
        })
    };
    // The waiting call is not sent anywhere while there is no address.
    assert_eq!(s1.requests(), 0);
    push.insert(s1.addr());
    let reply = waiting
        .await
        .expect("task")
        .expect("sent once an address came");
    assert_eq!(reply.into_inner().message, "waits");
    assert_eq!(pool.state(), ConnectivityState::Ready);
    pool.close().await.expect("clean close");
}

/// A pool built lazily follows the set pushed while it was Idle: nothing connects before the
/// first call, and that call goes to the pushed address.
#[tokio::test]
async fn a_lazy_pool_takes_the_set_pushed_while_idle() {
    let s1 = TestServer::start(loopback(89));
    let push = Push::new();
    let pool = builder("push.test:443")
        .discovery(push.clone())
        .connect_lazily(true)
        .build()
        .expect("valid pool");
    push.insert(s1.addr());
    assert_eq!(pool.state(), ConnectivityState::Idle);
    assert_eq!(s1.accepted_connections(), 0);
    tokio::time::timeout(WAIT, client(&pool).unary(echo("wakes it")))
        .await
        .expect("the call is not left waiting")
        .expect("first call connects");
    assert_eq!(s1.requests(), 1);
    pool.close().await.expect("clean close");
}
