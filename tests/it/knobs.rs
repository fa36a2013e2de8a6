//! The `Endpoint` knobs of issue #12, per pooled connection: TCP settings with any connector,
//! `local_address`, HTTP/2 SETTINGS the pool announces (max header list size, max frame size),
//! BDP window growth, idle mode and `reset_connect_backoff`.

use crate::support;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::common::{builder, client, echo, WAIT};
use support::hostile::{grpc_frame, grpc_message, kind, setting, Frame, HostileServer, Peer, ACK};
use support::{loopback, TestServer};
use tonic::Code;
use tonic_pool::connector::{BoxedIo, Connect, Destination};
use tonic_pool::state::{PoolSnapshot, Scope};
use tonic_pool::{BackoffConfig, BoxFuture, ConnectivityState, Pool};

/// What a test connector saw on the sockets it opened.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SocketSeen {
    nodelay: bool,
    keepalive: bool,
    keepalive_time: Duration,
    keepalive_interval: Duration,
    keepalive_retries: u32,
    local: SocketAddr,
}

/// A custom connector, as a user (or a TLS wrapper) writes one: it opens TCP with the pool's
/// settings through [`tonic_pool::connector::TcpSettings::connect`] and records what the
/// socket ended up with (read back with getsockopt).
#[derive(Debug, Default)]
struct InspectingConnector {
    seen: Arc<Mutex<Vec<SocketSeen>>>,
}

impl Connect for InspectingConnector {
    fn connect(&self, dst: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        let (tcp, addr, seen) = (
            dst.tcp.clone(),
            dst.addr.socket_addr().expect("a TCP target"),
            self.seen.clone(),
        );
        Box::pin(async move {
            let stream = tcp.connect(addr).await?;
            let sock = socket2::SockRef::from(&stream);
            seen.lock().unwrap().push(SocketSeen {
                nodelay: stream.nodelay()?,
                keepalive: sock.keepalive()?,
                keepalive_time: sock.tcp_keepalive_time()?,
                keepalive_interval: sock.tcp_keepalive_interval()?,
                keepalive_retries: sock.tcp_keepalive_retries()?,
                local: stream.local_addr()?,
            });
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}

/// The builder's TCP settings reach a custom connector with every destination, and the
/// helper it calls puts them on the socket: nodelay off, keepalive time, interval, retries
/// and the local address, as getsockopt reads them back.
#[tokio::test]
async fn tcp_settings_reach_a_custom_connectors_socket() {
    let server = TestServer::start(loopback(1));
    let connector = InspectingConnector::default();
    let seen = connector.seen.clone();
    let pool = builder(&format!("static:///{}", server.addr()))
        .connector(connector)
        .connections_per_endpoint(2)
        .tcp_nodelay(false)
        .tcp_keepalive(Duration::from_secs(41))
        .tcp_keepalive_interval(Duration::from_secs(7))
        .tcp_keepalive_retries(3)
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)))
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one socket per connection: {seen:?}");
    for socket in seen {
        assert_eq!(
            (socket.nodelay, socket.keepalive),
            (false, true),
            "{socket:?}"
        );
        assert_eq!(socket.keepalive_time, Duration::from_secs(41));
        assert_eq!(socket.keepalive_interval, Duration::from_secs(7));
        assert_eq!(socket.keepalive_retries, 3);
        assert_eq!(socket.local.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)));
    }
    pool.close().await.unwrap();
}

/// With the default connector, `local_address` binds every connection before it connects:
/// a server on 127.0.0.1 sees its calls come from 127.0.0.5.
#[tokio::test]
async fn local_address_is_the_address_the_server_sees() {
    let server = TestServer::start(loopback(1));
    let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
    let pool = builder(&format!("static:///{}", server.addr()))
        .connections_per_endpoint(2)
        .local_address(local)
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let mut client = client(&pool);
    for i in 0..4 {
        client.unary(echo(&format!("call {i}"))).await.unwrap();
    }
    let peers = server.requests_by_peer();
    assert_eq!(peers.values().sum::<u64>(), 4, "{peers:?}");
    assert!(peers.keys().all(|peer| peer.ip() == local), "{peers:?}");
    pool.close().await.unwrap();
}

/// A server that sends its SETTINGS and then holds the connection.
async fn settings_and_hold(mut peer: Peer) -> io::Result<()> {
    peer.send_settings(&[]).await?;
    peer.read_until_closed().await;
    Ok(())
}

/// The client's first SETTINGS frame (not an ack).
fn client_settings(frames: &[Frame]) -> Option<Frame> {
    frames
        .iter()
        .find(|f| f.is(kind::SETTINGS) && !f.has(ACK))
        .cloned()
}

/// `http2_max_header_list_size` and `http2_max_frame_size` are announced in the client's
/// SETTINGS, as read off the wire by a raw HTTP/2 server.
#[tokio::test]
async fn header_list_and_frame_size_limits_reach_the_wire() {
    let server = HostileServer::start(settings_and_hold);
    let pool = builder(&server.target())
        .http2_max_header_list_size(12_345)
        .http2_max_frame_size(65_536)
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    assert!(
        server
            .wait_until(WAIT, |r| client_settings(&r.frames).is_some())
            .await
    );
    let settings = client_settings(&server.frames()).unwrap();
    assert_eq!(
        settings.setting(setting::MAX_HEADER_LIST_SIZE),
        Some(12_345),
        "{settings:?}"
    );
    assert_eq!(
        settings.setting(setting::MAX_FRAME_SIZE),
        Some(65_536),
        "{settings:?}"
    );
    pool.close().await.unwrap();
}

/// Out-of-range limits are a clear configuration error from `build()`, naming the setting.
#[tokio::test]
async fn out_of_range_limits_are_refused() {
    let target = "static:///127.0.0.1:1";
    for (size, ok) in [
        (16_383, false),
        (16_384, true),
        (16_777_215, true),
        (16_777_216, false),
    ] {
        let built = builder(target).http2_max_frame_size(size).build();
        match built {
            Ok(pool) => {
                assert!(ok, "{size} accepted");
                pool.close().await.unwrap();
            }
            Err(e) => {
                assert!(!ok, "{size} refused: {e}");
                assert!(e.to_string().contains("http2_max_frame_size"), "{e}");
            }
        }
    }
    let e = builder(target)
        .http2_max_header_list_size(0)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("http2_max_header_list_size"), "{e}");
    let e = builder(target)
        .tcp_keepalive_retries(0)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("tcp_keepalive_retries"), "{e}");
}

/// Answers every request with one message of `size` bytes, in a single DATA frame.
async fn answer_in_one_frame(mut peer: Peer, size: usize) -> io::Result<()> {
    peer.send_settings(&[]).await?;
    loop {
        let (id, body) = peer.expect_request().await?;
        let _ = grpc_message(&body);
        let reply = support::echo::EchoReply {
            message: "x".repeat(size),
            ..Default::default()
        };
        peer.send_ok(id, &prost::Message::encode_to_vec(&reply))
            .await?;
    }
}

/// The announced frame size takes effect: a 20 000-byte DATA frame is a protocol error
/// under HTTP/2's 16 KiB default, and a normal response once the pool accepts 32 KiB frames.
#[tokio::test]
async fn a_larger_max_frame_size_takes_effect() {
    for (max_frame_size, ok) in [(None, false), (Some(32_768), true)] {
        let server = HostileServer::start(|peer| answer_in_one_frame(peer, 20_000));
        let pool = builder(&server.target())
            .http2_max_frame_size(max_frame_size)
            .build()
            .unwrap();
        pool.wait_ready(WAIT).await.unwrap();
        let result = client(&pool).unary(echo("big")).await;
        match (result, ok) {
            (Ok(reply), true) => assert_eq!(reply.into_inner().message.len(), 20_000),
            (Err(status), false) => assert_ne!(status.code(), Code::Ok),
            (result, _) => panic!("max frame size {max_frame_size:?}: {result:?}"),
        }
        pool.close().await.unwrap();
    }
}

/// Whether every endpoint of the pool, and the pool, are Idle.
fn all_idle(s: &PoolSnapshot) -> bool {
    s.state == ConnectivityState::Idle
        && !s.endpoints.is_empty()
        && s.endpoints
            .iter()
            .all(|e| e.state == ConnectivityState::Idle)
}

/// Idle mode: after the idle timeout without calls the pool and its endpoints go Idle and
/// every connection closes (the server sees none left open); the next call — an ordinary
/// fail-fast one — reconnects, succeeds, and the pool is Ready again.
#[tokio::test]
async fn idle_pool_closes_its_connections_and_the_next_call_reconnects() {
    let server = TestServer::start(loopback(1));
    let pool = builder(&format!("static:///{}", server.addr()))
        .connections_per_endpoint(2)
        .idle_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    client(&pool).unary(echo("before")).await.unwrap();
    assert!(
        pool.wait_until(WAIT, all_idle).await,
        "{:#?}",
        pool.snapshot()
    );
    assert!(server.wait_for_open_connections(0, WAIT).await);
    assert_eq!(server.accepted_connections(), 2);

    let reply = client(&pool).unary(echo("after")).await.unwrap();
    assert_eq!(reply.into_inner().message, "after");
    assert_eq!(pool.state(), ConnectivityState::Ready);
    assert!(server.wait_for_accepted(3, WAIT).await);
    pool.close().await.unwrap();
}

/// A call in flight keeps the pool out of idle mode however long it takes: a call four
/// idle timeouts long finishes, and the pool never went Idle meanwhile.
#[tokio::test]
async fn a_call_in_flight_keeps_the_pool_from_going_idle() {
    let server = TestServer::start(loopback(1));
    let pool = builder(&format!("static:///{}", server.addr()))
        .idle_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let mut events = pool.events();
    client(&pool)
        .unary(support::common::slow_echo("slow", 400))
        .await
        .unwrap();
    while let Ok(event) = events.try_recv() {
        assert!(
            !(event.scope == Scope::Pool && event.to == ConnectivityState::Idle),
            "went Idle during a call: {event:?}"
        );
    }
    pool.close().await.unwrap();
}

/// The connections idle mode closes end with the client's GOAWAY(NO_ERROR), and the pool
/// connects anew for the next call (a second connection on the raw server).
#[tokio::test]
async fn idle_mode_closes_connections_with_goaway() {
    let server = HostileServer::start(answer_each_request);
    let pool = builder(&server.target())
        .idle_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    assert!(
        pool.wait_until(WAIT, all_idle).await,
        "{:#?}",
        pool.snapshot()
    );
    assert!(
        server.wait_until(WAIT, |r| r.goaways().len() == 1).await,
        "{:?}",
        server.recorded().goaways()
    );
    assert_eq!(
        server.recorded().goaways()[0].error_code(),
        Some(support::hostile::code::NO_ERROR)
    );
    client(&pool).unary(echo("again")).await.unwrap();
    assert_eq!(server.accepted(), 2);
    pool.close().await.unwrap();
}

/// Answers every request with an empty reply.
async fn answer_each_request(peer: Peer) -> io::Result<()> {
    answer_in_one_frame(peer, 0).await
}

/// With `connect_lazily`, idle mode makes the pool connect only while it is used: Idle at
/// first, Ready for a call, Idle again, Ready again for the next.
#[tokio::test]
async fn a_lazy_pool_goes_back_to_idle_between_uses() {
    let server = TestServer::start(loopback(1));
    let pool = builder(&format!("static:///{}", server.addr()))
        .connect_lazily(true)
        .idle_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    assert_eq!(pool.state(), ConnectivityState::Idle);
    for round in 0..2u64 {
        client(&pool).unary(echo("use")).await.unwrap();
        assert!(
            pool.wait_until(WAIT, all_idle).await,
            "{:#?}",
            pool.snapshot()
        );
        assert!(server.wait_for_open_connections(0, WAIT).await);
        assert_eq!(server.accepted_connections(), round + 1);
    }
    pool.close().await.unwrap();
}

/// `reset_connect_backoff`: a pool backing off for a minute after its server was down
/// connects at once when told the server is back — Ready within a wait far shorter than the
/// backoff.
#[tokio::test]
async fn reset_connect_backoff_retries_at_once() {
    let addr = support::common::unused_addr(1);
    let pool = Pool::builder(format!("static:///{addr}"))
        .backoff(BackoffConfig {
            initial: Duration::from_secs(60),
            multiplier: 1.6,
            jitter: 0.2,
            max: Duration::from_secs(120),
            min_connect_timeout: Duration::from_secs(2),
        })
        .build()
        .unwrap();
    assert!(
        pool.wait_until(WAIT, |s| s.state == ConnectivityState::TransientFailure)
            .await
    );
    let _server = TestServer::start(addr);
    pool.reset_connect_backoff();
    pool.wait_ready(WAIT).await.unwrap();
    client(&pool).unary(echo("back")).await.unwrap();
    pool.close().await.unwrap();
}

/// The reply of the adaptive-window test: one `EchoReply` of 60 000 bytes, gRPC-framed.
fn big_reply_body() -> Vec<u8> {
    let reply = support::echo::EchoReply {
        message: "x".repeat(60_000),
        ..Default::default()
    };
    grpc_frame(&prost::Message::encode_to_vec(&reply))
}

/// Answers the first request so that the client's BDP sample is exact: the reply's first
/// DATA frame, then — once the client's PING arrives — the rest of it, and only then the
/// PING's ack. Every byte of the body falls within that PING's round trip.
async fn reply_around_the_clients_ping(mut peer: Peer) -> io::Result<()> {
    peer.send_settings(&[]).await?;
    let (id, _) = peer.expect_request().await?;
    let body = big_reply_body();
    peer.send_response_headers(id).await?;
    peer.send_data(id, &body[..1000], false).await?;
    let ping = peer.expect(|f| f.is(kind::PING) && !f.has(ACK)).await?;
    for chunk in body[1000..].chunks(16_384) {
        peer.send_data(id, chunk, false).await?;
    }
    peer.send_frame(kind::PING, ACK, 0, &ping.payload).await?;
    peer.send_headers(id, &[("grpc-status", "0")], true).await?;
    peer.read_until_closed().await;
    Ok(())
}

/// `http2_adaptive_window`: the connection starts with HTTP/2's 64 KiB windows; DATA makes
/// the pool send a PING, and when a whole window's worth (≥ 2/3) arrived within its round
/// trip the pool doubles its windows to twice the bytes counted — a new
/// `SETTINGS_INITIAL_WINDOW_SIZE` and a connection WINDOW_UPDATE on the wire.
#[tokio::test]
async fn adaptive_window_grows_the_windows_with_the_bdp_sample() {
    let server = HostileServer::start(reply_around_the_clients_ping);
    let pool = builder(&server.target())
        .http2_adaptive_window(true)
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let mut request = tonic::Request::new(echo("big"));
    request.set_timeout(WAIT);
    let reply = client(&pool).unary(request).await.unwrap();
    assert_eq!(reply.into_inner().message.len(), 60_000);

    let grown = u32::try_from(2 * big_reply_body().len()).unwrap();
    let window_of = |f: &Frame| f.setting(setting::INITIAL_WINDOW_SIZE);
    assert!(
        server
            .wait_until(WAIT, |r| r
                .frames
                .iter()
                .any(|f| window_of(f) == Some(grown)))
            .await,
        "no SETTINGS with window {grown}: {:?}",
        server.frames()
    );
    let frames = server.frames();
    // The first SETTINGS announced HTTP/2's default window (not a tonic `Channel`'s 2 MiB).
    let first = client_settings(&frames).unwrap();
    assert!(
        matches!(window_of(&first), None | Some(65_535)),
        "{first:?}"
    );
    assert!(
        frames
            .iter()
            .any(|f| f.is(kind::WINDOW_UPDATE) && f.stream == 0),
        "no connection WINDOW_UPDATE: {frames:?}"
    );
    pool.close().await.unwrap();
}

/// Without `http2_adaptive_window` nothing changes: data brings no PING, and the windows
/// are a tonic `Channel`'s (2 MiB per stream).
#[tokio::test]
async fn without_adaptive_window_data_sends_no_ping() {
    let server = HostileServer::start(|peer| answer_in_one_frame(peer, 60_000 - 5));
    let pool = builder(&server.target()).build().unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    client(&pool).unary(echo("big")).await.ok();
    let frames = server.frames();
    assert_eq!(
        frames
            .iter()
            .filter(|f| f.is(kind::PING) && !f.has(ACK))
            .count(),
        0
    );
    assert_eq!(
        client_settings(&frames).and_then(|f| f.setting(setting::INITIAL_WINDOW_SIZE)),
        Some(2 * 1024 * 1024)
    );
    pool.close().await.unwrap();
}

/// Against a real tonic server, adaptive flow control and keepalive together carry large
/// replies intact: 20 calls echoing 1 MiB each, over PINGs the server answers (the BDP PINGs
/// and keepalive's share h2's one PING in flight).
#[tokio::test]
async fn adaptive_window_with_keepalive_carries_large_replies_from_tonic() {
    let server = TestServer::start(loopback(1));
    let pool = builder(&format!("static:///{}", server.addr()))
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(Duration::from_millis(50))
        .keep_alive_while_idle(true)
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let mut client = client(&pool);
    for i in 0..20u8 {
        let request = support::echo::EchoRequest {
            payload: vec![i; 1024 * 1024],
            ..echo("large")
        };
        let reply = client.unary(request).await.unwrap().into_inner();
        assert_eq!(reply.payload.len(), 1024 * 1024);
        assert!(reply.payload.iter().all(|b| *b == i));
    }
    assert_eq!(server.accepted_connections(), 1, "no connection was lost");
    pool.close().await.unwrap();
}

/// Answers every request with response headers carrying a 4 000-byte `x-big` field.
async fn answer_with_big_headers(mut peer: Peer) -> io::Result<()> {
    peer.send_settings(&[]).await?;
    let big = "h".repeat(4_000);
    loop {
        let (id, _) = peer.expect_request().await?;
        peer.send_headers(
            id,
            &[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("x-big", &big),
            ],
            false,
        )
        .await?;
        peer.send_message(id, &[]).await?;
        peer.send_headers(id, &[("grpc-status", "0")], true).await?;
    }
}

/// The header list limit takes effect: response headers of about 4 KB fail the call under
/// a 1 KiB limit and pass under the default 16 KiB.
#[tokio::test]
async fn the_max_header_list_size_takes_effect() {
    for (limit, ok) in [(Some(1024), false), (None, true)] {
        let server = HostileServer::start(answer_with_big_headers);
        let mut builder = builder(&server.target());
        if let Some(limit) = limit {
            builder = builder.http2_max_header_list_size(limit);
        }
        let pool = builder.build().unwrap();
        pool.wait_ready(WAIT).await.unwrap();
        let mut request = tonic::Request::new(echo("headers"));
        request.set_timeout(WAIT);
        let result = client(&pool).unary(request).await;
        match (result, ok) {
            (Ok(reply), true) => assert_eq!(reply.metadata().get("x-big").unwrap().len(), 4_000),
            (Err(status), false) => assert_ne!(status.code(), Code::DeadlineExceeded, "{status:?}"),
            (result, _) => panic!("header list limit {limit:?}: {result:?}"),
        }
        pool.close().await.unwrap();
    }
}

/// Refuses every connection at once, recording the (virtual) time of each attempt.
#[derive(Debug, Default, Clone)]
struct RefusingRecorder {
    attempts: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

impl Connect for RefusingRecorder {
    fn connect(&self, _: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        self.attempts
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        Box::pin(std::future::ready(Err(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        ))))
    }
}

/// On tokio's paused clock, with a refusing connector and a jitter-free backoff of 10 s ×2:
/// attempts at 0, 10 and 30 s; `reset_connect_backoff` at 35 s makes the next attempt at
/// once, and the one after it 10 s later (the initial delay again), not 40 s later.
#[tokio::test(start_paused = true)]
async fn reset_connect_backoff_restarts_the_backoff_from_its_initial_delay() {
    let connector = RefusingRecorder::default();
    let attempts = connector.attempts.clone();
    let pool = Pool::builder("static:///127.0.0.1:1")
        .connector(connector)
        .backoff(BackoffConfig {
            initial: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.0,
            max: Duration::from_secs(600),
            min_connect_timeout: Duration::from_secs(20),
        })
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(35)).await;
    pool.reset_connect_backoff();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let seconds: Vec<u64> = attempts
        .lock()
        .unwrap()
        .iter()
        .map(|t| (*t - start).as_secs())
        .collect();
    assert_eq!(seconds, [0, 10, 30, 35, 45]);
    pool.close().await.unwrap();
}

/// Connects to an in-memory HTTP/2 server that answers every request with an empty gRPC
/// success, counting the connections it opened.
#[derive(Debug, Default, Clone)]
struct InMemoryGrpc {
    opened: Arc<Mutex<usize>>,
}

impl Connect for InMemoryGrpc {
    fn connect(&self, _: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        *self.opened.lock().unwrap() += 1;
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(server).await else {
                return;
            };
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                if let Ok(mut stream) = respond.send_response(response, false) {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let _ = stream.send_trailers(trailers);
                }
            }
        });
        Box::pin(std::future::ready(Ok(Box::new(client) as BoxedIo)))
    }
}

/// Answers with one address and a 5 s TTL, recording the (virtual) time of each query.
#[derive(Debug, Default, Clone)]
struct CountingResolver {
    asked: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

impl tonic_pool::resolve::Resolve for CountingResolver {
    fn resolve(
        &self,
        _: &tonic_pool::Target,
    ) -> BoxFuture<
        'static,
        Result<tonic_pool::resolve::Resolution, tonic_pool::resolve::ResolveError>,
    > {
        self.asked.lock().unwrap().push(tokio::time::Instant::now());
        let addr: SocketAddr = "127.0.0.2:50051".parse().unwrap();
        let answer = tonic_pool::resolve::Resolution::new([addr], Some(Duration::from_secs(5)));
        Box::pin(std::future::ready(Ok(answer)))
    }
}

/// One call through the pool as a tower service; true if it got `200 OK`.
async fn call_ok(pool: &Pool) -> bool {
    use tower::ServiceExt;
    let request = http::Request::builder()
        .method("POST")
        .uri("/echo.Echo/Unary")
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::empty())
        .unwrap();
    matches!(pool.clone().oneshot(request).await, Ok(r) if r.status() == http::StatusCode::OK)
}

/// On tokio's paused clock (in-memory connections): the pool goes Idle between one and two
/// idle timeouts after its last call, closes its connection and does not resolve while Idle
/// (its 5 s TTL passes many times); the next call resolves at once, connects anew and
/// succeeds.
#[tokio::test(start_paused = true)]
async fn idle_mode_stops_resolving_and_the_next_call_starts_afresh() {
    let connector = InMemoryGrpc::default();
    let resolver = CountingResolver::default();
    let pool = Pool::builder("dns:///svc.test:50051")
        .connector(connector.clone())
        .resolver(resolver.clone())
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    assert!(call_ok(&pool).await);
    let last_call = tokio::time::Instant::now();
    assert!(pool.wait_until(Duration::from_secs(600), all_idle).await);
    let idle_after = last_call.elapsed();
    assert!(
        idle_after >= Duration::from_secs(60) && idle_after <= Duration::from_secs(120),
        "{idle_after:?}"
    );
    let asked_when_idle = resolver.asked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(resolver.asked.lock().unwrap().len(), asked_when_idle);
    assert_eq!(pool.state(), ConnectivityState::Idle);

    let woken = tokio::time::Instant::now();
    assert!(call_ok(&pool).await);
    assert_eq!(pool.state(), ConnectivityState::Ready);
    let asked = resolver.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), asked_when_idle + 1);
    assert_eq!(
        *asked.last().unwrap(),
        woken,
        "resolved at once on the call"
    );
    assert_eq!(*connector.opened.lock().unwrap(), 2);
    pool.close().await.unwrap();
}
