//! Tests for `tests/support/proxy.rs`: the fault-injecting [`TestProxy`] in
//! front of real tonic echo servers.
//!
//! Each test uses its own loopback addresses, so a port the proxy frees in
//! `Mode::Refuse` is not taken by another test running in parallel.

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::echo::echo_client::EchoClient;
use support::echo::{EchoRequest, StreamRequest};
use support::proxy::{Mode, TestProxy};
use support::{loopback, ServerOptions, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// Upper bound for every wait in these tests.
const WAIT: Duration = Duration::from_secs(5);
/// How long a faulted call or read must stay incomplete.
const SILENCE: Duration = Duration::from_millis(300);

fn request(message: &str) -> EchoRequest {
    EchoRequest {
        payload: message.as_bytes().to_vec(),
        sleep_ms: 0,
        message: message.to_owned(),
    }
}

/// A server on `127.0.0.<server_ip>` and a proxy to it on `127.0.0.<proxy_ip>`.
fn server_and_proxy(server_ip: u8, proxy_ip: u8) -> (TestServer, TestProxy) {
    let server = TestServer::start(loopback(server_ip));
    let proxy = TestProxy::start(loopback(proxy_ip), server.addr());
    assert_eq!(proxy.addr().ip(), loopback(proxy_ip).ip());
    assert_ne!(proxy.addr().port(), 0);
    assert_eq!(proxy.upstream(), server.addr());
    (server, proxy)
}

/// A plain tonic channel to `http://<addr>` (eager connect, bounded).
async fn try_connect(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(WAIT)
        .connect()
        .await
}

async fn connect(addr: SocketAddr) -> EchoClient<Channel> {
    EchoClient::new(try_connect(addr).await.expect("connect through the proxy"))
}

/// One unary call, bounded by `WAIT`.
async fn unary(client: &mut EchoClient<Channel>, message: &str) -> Result<String, Status> {
    let call = client.unary(request(message));
    match tokio::time::timeout(WAIT, call).await {
        Ok(reply) => reply.map(|r| r.into_inner().server),
        Err(_) => panic!("unary call did not finish within {WAIT:?}"),
    }
}

/// A unary call with a gRPC deadline of `SILENCE`, itself bounded by `WAIT`.
async fn unary_with_deadline(client: &mut EchoClient<Channel>) -> Result<(), Status> {
    let mut req = Request::new(request("deadline"));
    req.set_timeout(SILENCE);
    match tokio::time::timeout(WAIT, client.unary(req)).await {
        Ok(reply) => reply.map(drop),
        Err(_) => panic!("the gRPC deadline did not fire within {WAIT:?}"),
    }
}

#[tokio::test]
async fn forwards_unary_and_streaming_calls() {
    let (server, proxy) = server_and_proxy(60, 61);
    assert_eq!(proxy.mode(), Mode::Forward);
    assert_eq!(proxy.uri(), format!("http://{}", proxy.addr()));

    let mut client = connect(proxy.addr()).await;
    for i in 0..3 {
        let served_by = unary(&mut client, &format!("m{i}")).await.unwrap();
        assert_eq!(served_by, server.name());
    }
    let mut stream = client
        .server_stream(StreamRequest {
            count: 5,
            interval_ms: 1,
            message: "tick".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        seqs.push(reply.seq);
    }
    assert_eq!(seqs, [0, 1, 2, 3, 4]);

    // One client connection through the proxy, one proxy connection upstream.
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.open(), 1);
    assert_eq!(server.accepted_connections(), 1);
    assert_eq!(server.requests(), 4);

    // Closing the client closes both legs.
    drop((stream, client));
    assert!(proxy.wait_for_open(0, WAIT).await);
    assert!(server.wait_for_open_connections(0, WAIT).await);
    assert_eq!(proxy.accepted(), 1);
}

#[tokio::test]
async fn blackhole_stalls_calls_and_accepts_silent_connections() {
    let (server, proxy) = server_and_proxy(62, 63);
    let mut client = connect(proxy.addr()).await;
    unary(&mut client, "before").await.unwrap();

    proxy.set_mode(Mode::Blackhole);
    assert_eq!(proxy.mode(), Mode::Blackhole);

    // With a gRPC deadline, the client gives up on its own.
    let started = Instant::now();
    let status = unary_with_deadline(&mut client).await.unwrap_err();
    assert!(started.elapsed() >= SILENCE);
    eprintln!("blackhole + deadline: {status:?}");
    // tonic's client-side deadline reports Cancelled("Timeout expired").
    assert!(
        matches!(
            status.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{status:?}"
    );
    // Without one, the call just never completes.
    let call = client.unary(request("no deadline"));
    assert!(tokio::time::timeout(SILENCE, call).await.is_err());
    assert_eq!(server.requests(), 1, "nothing reached the server");

    // A new connection is accepted (not refused), then stays silent.
    let mut raw = TcpStream::connect(proxy.addr())
        .await
        .expect("blackhole accepts connections");
    assert!(proxy.wait_for_accepted(2, WAIT).await);
    assert_eq!(proxy.open(), 2);
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(SILENCE, raw.read(&mut buf)).await;
    assert!(read.is_err(), "blackholed connection received {read:?}");
    assert_eq!(server.accepted_connections(), 1, "no upstream connect yet");

    // Back to Forward: new channels work, and paused connections resume.
    proxy.set_mode(Mode::Forward);
    let mut fresh = connect(proxy.addr()).await;
    unary(&mut fresh, "after").await.unwrap();
    assert!(proxy.wait_for_accepted(3, WAIT).await);
    // The old channel's connection was paused, not broken.
    unary(&mut client, "old channel").await.unwrap();
    // The silent connection now reaches the server, whose HTTP/2 SETTINGS
    // frame arrives without the client sending anything.
    let n = tokio::time::timeout(WAIT, raw.read(&mut buf))
        .await
        .expect("resumed connection receives bytes")
        .unwrap();
    assert!(n > 0);
    assert!(server.wait_for_accepted(3, WAIT).await);
}

#[tokio::test]
async fn reset_all_breaks_streams_in_flight_and_keeps_forwarding() {
    let (server, proxy) = server_and_proxy(64, 65);
    let mut client = connect(proxy.addr()).await;
    let mut stream = client
        .server_stream(StreamRequest {
            count: 10_000,
            interval_ms: 10,
            message: "tick".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.seq, 0);

    proxy.reset_all();
    assert_eq!(
        proxy.open(),
        0,
        "reset_all returns once connections are gone"
    );
    assert_eq!(proxy.mode(), Mode::Forward);

    // Replies already buffered may still arrive; then the stream fails.
    let status = tokio::time::timeout(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended cleanly after a reset"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("stream fails after reset_all");
    eprintln!("reset_all during server stream: {status:?}");
    // hyper reports the RST as Unknown("h2 protocol error: ...").
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    // The upstream leg was reset too.
    assert!(server.wait_for_open_connections(0, WAIT).await);

    // New connections are forwarded as usual.
    let mut fresh = connect(proxy.addr()).await;
    assert_eq!(unary(&mut fresh, "fresh").await.unwrap(), server.name());
    assert!(proxy.wait_for_accepted(2, WAIT).await);

    // The old tonic channel reconnects by itself (first call may fail).
    let first_try = unary(&mut client, "old").await;
    eprintln!("old channel, first call after reset: {first_try:?}");
    if first_try.is_err() {
        unary(&mut client, "old again").await.unwrap();
    }
}

#[tokio::test]
async fn refuse_fails_connects_fast_and_recovers() {
    let (server, proxy) = server_and_proxy(66, 67);
    let mut client = connect(proxy.addr()).await;
    unary(&mut client, "before").await.unwrap();

    proxy.set_mode(Mode::Refuse);
    let started = Instant::now();
    let err = TcpStream::connect(proxy.addr()).await.expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let err = try_connect(proxy.addr()).await.expect_err("refused");
    eprintln!("tonic connect while refusing: {err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(proxy.accepted(), 1);

    // Established connections keep forwarding.
    unary(&mut client, "during").await.unwrap();

    proxy.set_mode(Mode::Forward);
    let mut fresh = connect(proxy.addr()).await;
    assert_eq!(unary(&mut fresh, "after").await.unwrap(), server.name());
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test]
async fn reset_all_mode_resets_open_and_new_connections() {
    let (server, proxy) = server_and_proxy(68, 69);
    let mut client = connect(proxy.addr()).await;
    unary(&mut client, "before").await.unwrap();

    proxy.set_mode(Mode::ResetAll);
    assert_eq!(proxy.open(), 0);
    assert!(server.wait_for_open_connections(0, WAIT).await);

    // A new TCP connection is accepted, then reset straight away. On
    // loopback the RST often beats the connecting side's check of the
    // handshake, so `connect` itself may report the reset.
    let is_reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
    match TcpStream::connect(proxy.addr()).await {
        Ok(mut raw) => {
            // The socket reports the reset once: to the write if the RST came before it
            // (the read then sees the closed socket's end), else to the read.
            let wrote = raw.write_all(b"hello").await;
            if !matches!(&wrote, Err(e) if is_reset(e)) {
                let mut buf = [0u8; 16];
                let read = tokio::time::timeout(WAIT, raw.read(&mut buf))
                    .await
                    .expect("reset arrives");
                assert!(
                    matches!(&read, Err(e) if is_reset(e)),
                    "{wrote:?} then {read:?}"
                );
            }
        }
        Err(err) => assert!(is_reset(&err), "{err:?}"),
    }
    assert!(
        proxy.wait_for_accepted(2, WAIT).await,
        "accepted, not refused"
    );
    assert!(proxy.wait_for_open(0, WAIT).await);

    // tonic calls fail while the mode lasts.
    let status = unary(&mut client, "during").await.unwrap_err();
    eprintln!("old channel in ResetAll mode: {status:?}");
    let fresh = try_connect(proxy.addr()).await;
    match fresh {
        Ok(channel) => {
            let status = unary(&mut EchoClient::new(channel), "fresh")
                .await
                .unwrap_err();
            eprintln!("new channel in ResetAll mode: connect ok, call {status:?}");
        }
        Err(err) => eprintln!("new channel in ResetAll mode: connect {err:?}"),
    }
    assert_eq!(server.requests(), 1);

    proxy.set_mode(Mode::Forward);
    let mut fresh = connect(proxy.addr()).await;
    unary(&mut fresh, "after").await.unwrap();
}

#[tokio::test]
async fn set_upstream_retargets_new_connections() {
    let a = TestServer::start_with(
        loopback(70),
        ServerOptions {
            name: "a".into(),
            ..ServerOptions::default()
        },
    );
    let b = TestServer::start_with(
        loopback(71),
        ServerOptions {
            name: "b".into(),
            ..ServerOptions::default()
        },
    );
    let proxy = TestProxy::start(loopback(72), a.addr());
    let mut to_a = connect(proxy.addr()).await;
    assert_eq!(unary(&mut to_a, "x").await.unwrap(), "a");

    proxy.set_upstream(b.addr());
    assert_eq!(proxy.upstream(), b.addr());
    let mut to_b = connect(proxy.addr()).await;
    assert_eq!(unary(&mut to_b, "y").await.unwrap(), "b");
    // The open connection stays on its upstream.
    assert_eq!(unary(&mut to_a, "z").await.unwrap(), "a");
    assert_eq!(proxy.open(), 2);
}

#[tokio::test]
async fn stop_closes_everything() {
    let (server, mut proxy) = server_and_proxy(73, 74);
    let mut client = connect(proxy.addr()).await;
    unary(&mut client, "before").await.unwrap();
    assert!(proxy.is_running());

    proxy.stop();
    assert!(!proxy.is_running());
    assert_eq!(proxy.open(), 0);
    assert!(server.wait_for_open_connections(0, WAIT).await);
    let err = TcpStream::connect(proxy.addr()).await.expect_err("stopped");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // Controls on a stopped proxy are no-ops; stop is idempotent.
    proxy.set_mode(Mode::Blackhole);
    proxy.reset_all();
    proxy.stop();

    let status = unary(&mut client, "after").await.unwrap_err();
    eprintln!("call after the proxy stopped: {status:?}");
}
