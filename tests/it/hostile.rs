//! Hostile servers, scripted frame by frame (`support::hostile`): whatever a server sends, a
//! call ends with the gRPC status gRPC's `PROTOCOL-HTTP2.md` names (or a clear INTERNAL),
//! nothing panics, nothing outlives the call's deadline, the in-flight counts return to zero,
//! and an unusable connection is replaced.

use crate::support;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use prost::Message;
use support::common::{builder, client, echo, WAIT};
use support::echo::{EchoReply, EchoRequest};
use support::hostile::{
    code, grpc_message, kind, setting, Frame, HostileServer, Peer, GRPC_RESPONSE, MAX_STREAM_ID,
};
use tokio::sync::oneshot;
use tonic::Code;
use tonic_pool::{ConnectivityState, Pool, WaitForReady};

/// The deadline of a call to a hostile server.
const DEADLINE: Duration = Duration::from_millis(500);
/// How long after its deadline a call may still be running before the test calls it hung:
/// room for a loaded machine, not a performance bar.
const SLACK: Duration = Duration::from_secs(5);

/// The echo request in a request body.
fn request_of(body: &[u8]) -> EchoRequest {
    EchoRequest::decode(grpc_message(body)).expect("the body is one EchoRequest")
}

/// The encoded reply to a request.
fn reply_to(request: &EchoRequest) -> Vec<u8> {
    EchoReply {
        message: request.message.clone(),
        ..EchoReply::default()
    }
    .encode_to_vec()
}

/// A well-behaved server: its SETTINGS, then one answer per request, until the client leaves.
async fn serve_well(mut peer: Peer) -> io::Result<()> {
    peer.send_settings(&[]).await?;
    serve_requests(&mut peer).await
}

/// Answers every request with its echo.
async fn serve_requests(peer: &mut Peer) -> io::Result<()> {
    loop {
        let (id, body) = peer.expect_request().await?;
        peer.send_ok(id, &reply_to(&request_of(&body))).await?;
    }
}

/// Requests seen by a server, by message, over all its connections.
#[derive(Clone, Debug, Default)]
struct Seen(Arc<Mutex<HashMap<String, Vec<usize>>>>);

impl Seen {
    /// Notes a request (its body) on connection `conn`; returns the request.
    fn note(&self, conn: usize, body: &[u8]) -> EchoRequest {
        let request = request_of(body);
        self.0
            .lock()
            .unwrap()
            .entry(request.message.clone())
            .or_default()
            .push(conn);
        request
    }

    /// The connections on which the call with `message` arrived, once per attempt.
    fn of(&self, message: &str) -> Vec<usize> {
        self.0
            .lock()
            .unwrap()
            .get(message)
            .cloned()
            .unwrap_or_default()
    }
}

/// One unary call with `message` and a `deadline`, bounded by the deadline plus [`SLACK`].
async fn call_with(
    pool: &Pool,
    message: &str,
    deadline: Duration,
    wait_for_ready: bool,
) -> Result<EchoReply, tonic::Status> {
    let mut request = tonic::Request::new(echo(message));
    request.set_timeout(deadline);
    if wait_for_ready {
        request.extensions_mut().insert(WaitForReady(true));
    }
    let mut client = client(pool);
    match tokio::time::timeout(deadline + SLACK, client.unary(request)).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => panic!(
            "call {message:?} still running {SLACK:?} after its deadline of {deadline:?}: {:#?}",
            pool.snapshot()
        ),
    }
}

/// One unary call with the default [`DEADLINE`].
async fn call(pool: &Pool, message: &str) -> Result<EchoReply, tonic::Status> {
    call_with(pool, message, DEADLINE, false).await
}

/// Asserts that a call failed with `code`.
fn assert_code(result: Result<EchoReply, tonic::Status>, code: Code, what: &str) {
    assert_code_in(result, &[code], what);
}

/// Asserts that a call failed with one of `codes`.
fn assert_code_in(result: Result<EchoReply, tonic::Status>, codes: &[Code], what: &str) {
    match result {
        Ok(reply) => panic!("{what}: succeeded ({reply:?}), expected one of {codes:?}"),
        Err(status) => assert!(codes.contains(&status.code()), "{what}: {status:?}"),
    }
}

/// Waits until no call is in flight anywhere in the pool.
async fn assert_settles(pool: &Pool) {
    let settled = pool.wait_until(WAIT, |s| s.in_flight() == 0).await;
    assert!(settled, "calls still in flight: {:#?}", pool.snapshot());
}

/// Successful connects over every connection slot of the pool.
fn connects(pool: &Pool) -> u64 {
    pool.snapshot()
        .endpoints
        .iter()
        .flat_map(|e| &e.connections)
        .map(|c| c.connects)
        .sum()
}

/// The pool is Ready again on a connection the server accepted after its first `before`
/// ones, and a call goes through.
async fn assert_replaced(pool: &Pool, server: &HostileServer, before: usize) {
    assert!(
        server.wait_until(WAIT, |r| r.accepted > before).await,
        "no new connection: {:#?}",
        pool.snapshot()
    );
    assert!(
        pool.wait_until(WAIT, |s| s.state == ConnectivityState::Ready)
            .await,
        "not Ready again: {:#?}",
        pool.snapshot()
    );
    call_with(pool, "after", DEADLINE, true)
        .await
        .expect("a call on the new connection succeeds");
}

/// A pool for one hostile server with the fast test backoff, Ready.
async fn ready_pool(server: &HostileServer) -> Pool {
    let pool = builder(&server.target()).build().unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    pool
}

/// Where a GOAWAY's last-stream-id falls relative to the call it hits.
#[derive(Clone, Copy, Debug)]
enum Last {
    Zero,
    /// The stream before the call's: answered already.
    Below,
    At,
    /// An id the client never opened.
    Above,
    Max,
    /// Below the call's stream, then a second GOAWAY raising it to the maximum, which a
    /// server must never do (RFC 9113 §6.8).
    Raised,
}

/// GOAWAYs with any last-stream-id (0, below, at, above the call's stream, the maximum, or
/// raised by a second GOAWAY) and any code (known or not): a call at or below the id is
/// answered on its connection, one above it is retried transparently and answered on a new
/// connection; no call fails or is answered twice, and the pool is Ready again on a fresh
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_with_any_ids_and_codes() {
    let lasts = [
        Last::Zero,
        Last::Below,
        Last::At,
        Last::Above,
        Last::Max,
        Last::Raised,
    ];
    let codes = [
        code::NO_ERROR,
        code::PROTOCOL_ERROR,
        code::INTERNAL_ERROR,
        code::ENHANCE_YOUR_CALM,
        0xdead_beef,
    ];
    for last in lasts {
        for error in codes {
            let answered = Seen::default();
            let server = HostileServer::start({
                let answered = answered.clone();
                move |mut peer: Peer| {
                    let answered = answered.clone();
                    async move {
                        if peer.index() > 0 {
                            peer.send_settings(&[]).await?;
                            loop {
                                let (id, body) = peer.expect_request().await?;
                                let request = answered.note(peer.index(), &body);
                                peer.send_ok(id, &reply_to(&request)).await?;
                            }
                        }
                        peer.send_settings(&[]).await?;
                        let (first, body) = peer.expect_request().await?;
                        let request = answered.note(0, &body);
                        peer.send_ok(first, &reply_to(&request)).await?;
                        let (id, body) = peer.expect_request().await?;
                        let last_id = match last {
                            Last::Zero => 0,
                            Last::Below | Last::Raised => first,
                            Last::At => id,
                            Last::Above => id + 100,
                            Last::Max => MAX_STREAM_ID,
                        };
                        peer.send_goaway(last_id, error, b"hostile").await?;
                        if let Last::Raised = last {
                            peer.send_goaway(MAX_STREAM_ID, error, b"raised").await?;
                        }
                        if id <= last_id {
                            let request = answered.note(0, &body);
                            peer.send_ok(id, &reply_to(&request)).await?;
                        }
                        peer.read_until_closed().await;
                        Ok(())
                    }
                }
            });
            let pool = ready_pool(&server).await;
            let case = format!("GOAWAY last {last:?} code {error:#x}");
            call(&pool, "first").await.expect("the first call");
            let hit = call_with(&pool, "hit", WAIT, true).await;
            assert!(hit.is_ok(), "{case}: {hit:?}");
            assert_eq!(answered.of("hit").len(), 1, "{case}: answered once");
            assert_settles(&pool).await;
            assert_replaced(&pool, &server, 1).await;
            assert_settles(&pool).await;
            pool.close().await.unwrap();
        }
    }
}

/// A PING flood (10 000 PINGs while a call waits for its response) neither fails the call
/// nor the connection: the client keeps acking, the call and later ones succeed on the same
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_changes_nothing() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[]).await?;
        let (id, body) = peer.expect_request().await?;
        let flood: Vec<u8> = (0u64..10_000)
            .flat_map(|i| support::hostile::encode(kind::PING, 0, 0, &i.to_be_bytes()))
            .collect();
        peer.send_raw(&flood).await?;
        peer.send_ok(id, &reply_to(&request_of(&body))).await?;
        serve_requests(&mut peer).await
    });
    let pool = ready_pool(&server).await;
    call(&pool, "flooded")
        .await
        .expect("the call under the flood");
    call(&pool, "after").await.expect("a later call");
    let acked = server
        .wait_until(WAIT, |r| {
            r.count(|f| f.is(kind::PING) && f.has(support::hostile::ACK)) > 0
        })
        .await;
    assert!(acked, "the client acks PINGs");
    let recorded = server.recorded();
    println!(
        "ping flood: {} acks for 10000 PINGs",
        recorded.count(|f| f.is(kind::PING) && f.has(support::hostile::ACK))
    );
    assert!(recorded.goaways().is_empty(), "{:?}", recorded.goaways());
    assert_eq!(server.accepted(), 1);
    assert_settles(&pool).await;
    pool.close().await.unwrap();
}

/// A SETTINGS flood (1 000 frames changing the stream limit and the window while a call
/// waits): the client acks every one, the call succeeds, and the pool ends with the last
/// stream limit sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_is_acked_and_the_last_limit_wins() {
    const FLOOD: u32 = 1_000;
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[(setting::MAX_CONCURRENT_STREAMS, 100)])
            .await?;
        let (id, body) = peer.expect_request().await?;
        let flood: Vec<u8> = (1..=FLOOD)
            .flat_map(|i| {
                support::hostile::settings(&[
                    (setting::MAX_CONCURRENT_STREAMS, 100 + i),
                    (setting::INITIAL_WINDOW_SIZE, 65_535 + i),
                ])
            })
            .collect();
        peer.send_raw(&flood).await?;
        peer.send_ok(id, &reply_to(&request_of(&body))).await?;
        serve_requests(&mut peer).await
    });
    let pool = ready_pool(&server).await;
    call(&pool, "flooded")
        .await
        .expect("the call under the flood");
    let all_acked = server
        .wait_until(WAIT, |r| {
            r.count(|f| f.is(kind::SETTINGS) && f.has(support::hostile::ACK)) == 1 + FLOOD as usize
        })
        .await;
    assert!(
        all_acked,
        "acks: {}",
        server.count(|f| f.is(kind::SETTINGS))
    );
    let limit = pool
        .wait_until(WAIT, |s| {
            s.endpoints[0].connections[0].max_concurrent_streams == Some(100 + FLOOD)
        })
        .await;
    assert!(limit, "{:#?}", pool.snapshot());
    call(&pool, "after").await.expect("a later call");
    assert_eq!(server.accepted(), 1);
    assert_settles(&pool).await;
    pool.close().await.unwrap();
}

/// A client-streaming call whose request stream stays open until the call ends: its first
/// message is `message`.
async fn open_client_stream(pool: &Pool, message: &str) -> Result<EchoReply, tonic::Status> {
    let (more, requests) = tokio::sync::mpsc::channel(4);
    more.send(echo(message)).await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(requests));
    request.set_timeout(DEADLINE);
    let mut client = client(pool);
    let call = client.client_stream(request);
    let result = tokio::time::timeout(DEADLINE + SLACK, call)
        .await
        .unwrap_or_else(|_| panic!("call {message:?} outlived its deadline"));
    drop(more);
    result.map(tonic::Response::into_inner)
}

/// WINDOW_UPDATEs that break flow control. A stream window overflow, on a stream the
/// client is still writing: the client resets that stream (FLOW_CONTROL_ERROR), the call
/// fails INTERNAL, the connection goes on. An increment of 0 on a stream, and a connection
/// window overflow: the call fails (INTERNAL, or UNAVAILABLE as a lost connection), the
/// client closes the connection
/// with GOAWAY (PROTOCOL_ERROR — h2 rejects a zero increment while decoding the frame —,
/// FLOW_CONTROL_ERROR), and the pool is Ready again on a new connection each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_update_overflow() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[]).await?;
        loop {
            let id = peer.expect_headers().await?;
            let data = peer.expect(|f| f.is(kind::DATA) && f.stream == id).await?;
            let request = request_of(&data.payload);
            match request.message.as_str() {
                "stream overflow" => peer.send_window_update(id, MAX_STREAM_ID).await?,
                "stream zero" => peer.send_window_update(id, 0).await?,
                "connection overflow" => peer.send_window_update(0, MAX_STREAM_ID).await?,
                _ => peer.send_ok(id, &reply_to(&request)).await?,
            }
        }
    });
    let pool = ready_pool(&server).await;
    assert_code(
        open_client_stream(&pool, "stream overflow").await,
        Code::Internal,
        "stream window overflow",
    );
    call(&pool, "fine").await.expect("the connection goes on");
    let frames = server.frames();
    assert!(
        frames
            .iter()
            .any(|f| f.is_reset(1, code::FLOW_CONTROL_ERROR)),
        "{frames:?}"
    );
    assert_eq!(server.accepted(), 1);
    assert_settles(&pool).await;

    for (message, goaway) in [
        ("stream zero", code::PROTOCOL_ERROR),
        ("connection overflow", code::FLOW_CONTROL_ERROR),
    ] {
        let accepted = server.accepted();
        assert_code_in(
            open_client_stream(&pool, message).await,
            &[Code::Internal, Code::Unavailable],
            message,
        );
        let closed = server
            .wait_until(WAIT, |r| {
                r.goaways()
                    .iter()
                    .any(|g| g.conn == accepted - 1 && g.error_code() == Some(goaway))
            })
            .await;
        assert!(closed, "{message}: {:?}", server.recorded().goaways());
        assert_settles(&pool).await;
        assert_replaced(&pool, &server, accepted).await;
        assert_settles(&pool).await;
    }
    pool.close().await.unwrap();
}

/// The gRPC status PROTOCOL-HTTP2.md names for a stream reset by the server with `code`.
fn status_of_reset(code: u32) -> Code {
    match code {
        code::REFUSED_STREAM => Code::Unavailable,
        code::CANCEL => Code::Cancelled,
        code::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        code::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

/// RST_STREAM with every HTTP/2 error code (and an unknown one), before and after the
/// response headers: each call fails with the code PROTOCOL-HTTP2.md maps it to (CANCEL →
/// CANCELLED, REFUSED_STREAM → UNAVAILABLE, ENHANCE_YOUR_CALM → RESOURCE_EXHAUSTED,
/// INADEQUATE_SECURITY → PERMISSION_DENIED, the rest INTERNAL), the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rst_stream_of_every_code_maps_per_the_spec() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[]).await?;
        loop {
            let (id, body) = peer.expect_request().await?;
            let request = request_of(&body);
            let message = request.message.clone();
            let mut words = message.split(' ');
            let (Some(code), Some(when)) = (words.next(), words.next()) else {
                peer.send_ok(id, &reply_to(&request)).await?;
                continue;
            };
            let code: u32 = code.parse().expect("a code");
            if when == "after" {
                peer.send_response_headers(id).await?;
            }
            peer.send_rst(id, code).await?;
        }
    });
    let pool = ready_pool(&server).await;
    for reset in (0..=0xd).chain([0x1234]) {
        for when in ["before", "after"] {
            let result = call(&pool, &format!("{reset} {when}")).await;
            assert_code(
                result,
                status_of_reset(reset),
                &format!("RST_STREAM {reset:#x} {when} the response headers"),
            );
            assert_settles(&pool).await;
        }
    }
    call(&pool, "fine").await.expect("the connection goes on");
    assert_eq!(server.accepted(), 1);
    assert!(server.recorded().goaways().is_empty());
    pool.close().await.unwrap();
}

/// Response headers without `:status` are malformed: the client resets the stream with
/// PROTOCOL_ERROR, the call fails INTERNAL, and the connection goes on. A `:status` that is
/// not a number fails the call too (INTERNAL, or UNAVAILABLE as a lost connection): h2 takes
/// it as an error of the header block, so of the whole connection (GOAWAY PROTOCOL_ERROR),
/// and the pool is Ready again on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_without_status_fail_internal() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[]).await?;
        loop {
            let (id, body) = peer.expect_request().await?;
            let request = request_of(&body);
            match request.message.as_str() {
                "no status" => {
                    peer.send_headers(id, &[("content-type", "application/grpc")], false)
                        .await?
                }
                "bad status" => {
                    peer.send_headers(
                        id,
                        &[(":status", "2x0"), ("content-type", "application/grpc")],
                        false,
                    )
                    .await?
                }
                _ => peer.send_ok(id, &reply_to(&request)).await?,
            }
        }
    });
    let pool = ready_pool(&server).await;
    assert_code(call(&pool, "no status").await, Code::Internal, "no :status");
    call(&pool, "fine").await.expect("the connection goes on");
    let frames = server.frames();
    assert!(
        frames.iter().any(|f| f.is_reset(1, code::PROTOCOL_ERROR)),
        "{frames:?}"
    );
    assert_eq!(server.accepted(), 1);
    assert_settles(&pool).await;

    assert_code_in(
        call(&pool, "bad status").await,
        &[Code::Internal, Code::Unavailable],
        "bad :status",
    );
    let refused = server
        .wait_until(WAIT, |r| {
            r.frames.iter().any(|f| {
                f.is_reset(5, code::PROTOCOL_ERROR)
                    || (f.is(kind::GOAWAY) && f.error_code() == Some(code::PROTOCOL_ERROR))
            })
        })
        .await;
    assert!(refused, "{:?}", server.frames());
    assert_settles(&pool).await;
    call_with(&pool, "after", DEADLINE, true)
        .await
        .expect("the pool serves the next call");
    assert_settles(&pool).await;
    pool.close().await.unwrap();
}

/// Responses that are not gRPC (`content-type` text/html or text/plain). Without a body, the
/// HTTP status maps per gRPC's http-grpc-status-mapping (tonic's rule): 400 → INTERNAL, 401 →
/// UNAUTHENTICATED, 403 → PERMISSION_DENIED, 404 → UNIMPLEMENTED, 429/502/503/504 →
/// UNAVAILABLE, others UNKNOWN. With an HTML body, tonic reads the body as gRPC first and
/// fails INTERNAL (a 200) or INTERNAL/the mapped code (an error status) — never OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_grpc_responses_map_their_http_status() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[]).await?;
        loop {
            let (id, body) = peer.expect_request().await?;
            let request = request_of(&body);
            let message = request.message.clone();
            let Some((status, with_body)) = message.split_once(' ') else {
                peer.send_ok(id, &reply_to(&request)).await?;
                continue;
            };
            let fields = [(":status", status), ("content-type", "text/html")];
            if with_body == "body" {
                peer.send_headers(id, &fields, false).await?;
                peer.send_data(id, b"<html><body>not gRPC</body></html>", true)
                    .await?;
            } else {
                peer.send_headers(id, &fields, true).await?;
            }
        }
    });
    let pool = ready_pool(&server).await;
    let mapped = [
        ("200", Code::Unknown),
        ("400", Code::Internal),
        ("401", Code::Unauthenticated),
        ("403", Code::PermissionDenied),
        ("404", Code::Unimplemented),
        ("429", Code::Unavailable),
        ("500", Code::Unknown),
        ("502", Code::Unavailable),
        ("503", Code::Unavailable),
        ("504", Code::Unavailable),
    ];
    for (status, code) in mapped {
        assert_code(
            call(&pool, &format!("{status} empty")).await,
            code,
            &format!("HTTP {status} text/html without a body"),
        );
        let with_body = call(&pool, &format!("{status} body")).await;
        match with_body {
            Err(s) if s.code() == Code::Internal || s.code() == code => {}
            other => panic!("HTTP {status} text/html with a body: {other:?}"),
        }
    }
    call(&pool, "fine").await.expect("the connection goes on");
    assert_eq!(server.accepted(), 1);
    assert_settles(&pool).await;
    pool.close().await.unwrap();
}

/// DATA after the trailers (after END_STREAM) on a finished call: the call has its status
/// already (OK), the client answers the stray frame as a protocol error (RST_STREAM
/// STREAM_CLOSED, or GOAWAY), and the pool serves the next call (on a new connection if
/// the old one was closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_after_trailers() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[]).await?;
        if peer.index() == 0 {
            let (id, body) = peer.expect_request().await?;
            peer.send_ok(id, &reply_to(&request_of(&body))).await?;
            peer.send_data(id, &support::hostile::grpc_frame(b"late"), false)
                .await?;
        }
        serve_requests(&mut peer).await
    });
    let pool = ready_pool(&server).await;
    let reply = call(&pool, "first")
        .await
        .expect("the call ends at its trailers");
    assert_eq!(reply.message, "first");
    let answered = server
        .wait_until(WAIT, |r| {
            r.frames
                .iter()
                .any(|f| f.is_reset(1, code::STREAM_CLOSED) || f.is_reset(1, code::PROTOCOL_ERROR))
                || !r.goaways().is_empty()
        })
        .await;
    let frames = server.frames();
    assert!(
        answered,
        "the client ignored DATA after END_STREAM: {frames:?}"
    );
    println!(
        "DATA after trailers: the client sent {:?}",
        frames
            .iter()
            .filter(|f| f.is(kind::RST_STREAM) || f.is(kind::GOAWAY))
            .collect::<Vec<_>>()
    );
    assert_settles(&pool).await;
    call_with(&pool, "next", DEADLINE, true)
        .await
        .expect("the next call");
    assert_settles(&pool).await;
    pool.close().await.unwrap();
}

/// A response body that never ends (a message every 5 ms, no trailers): the call's deadline
/// ends it with DEADLINE_EXCEEDED, the client resets the stream, and nothing stays in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_ending_body_is_cut_at_the_deadline() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[]).await?;
        let (id, body) = peer.expect_request().await?;
        let reply = reply_to(&request_of(&body));
        peer.send_response_headers(id).await?;
        // Bounded: 30 s of messages, far past any deadline here.
        for _ in 0..6_000 {
            peer.send_message(id, &reply).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    });
    let pool = ready_pool(&server).await;
    assert_code(
        call(&pool, "endless").await,
        Code::DeadlineExceeded,
        "never-ending body",
    );
    assert_settles(&pool).await;
    assert!(
        server
            .wait_until(WAIT, |r| r
                .frames
                .iter()
                .any(|f| f.is(kind::RST_STREAM) && f.stream == 1))
            .await,
        "the client resets the stream: {:?}",
        server.frames()
    );
    pool.close().await.unwrap();
}

/// A server that stops reading while a large request is on its way (its windows wide open,
/// so only TCP holds the client back): the call fails DEADLINE_EXCEEDED at its deadline,
/// nothing stays in flight, and keepalive replaces the stuck connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_stops_reading_is_bounded_by_the_deadline() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        if peer.index() > 0 {
            return serve_well(peer).await;
        }
        peer.send_settings(&[(setting::INITIAL_WINDOW_SIZE, MAX_STREAM_ID)])
            .await?;
        peer.send_window_update(0, MAX_STREAM_ID - 65_535).await?;
        peer.expect_headers().await?;
        peer.stop_reading();
        peer.hold().await
    });
    // Keepalive finds the silent peer at least 2 s after its last word: well after the call's
    // deadline (0.5 s), however slowly this machine runs the call.
    let pool = builder(&server.target())
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true)
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    let mut request = tonic::Request::new(support::echo::EchoRequest {
        payload: vec![7; 16 << 20],
        ..echo("large")
    });
    request.set_timeout(DEADLINE);
    let result = tokio::time::timeout(DEADLINE + SLACK, client(&pool).unary(request))
        .await
        .expect("the call ends by its deadline");
    assert_code(
        result.map(tonic::Response::into_inner),
        Code::DeadlineExceeded,
        "a peer that stopped reading",
    );
    assert_settles(&pool).await;
    assert_replaced(&pool, &server, 1).await;
    assert_settles(&pool).await;
    pool.close().await.unwrap();
}

/// Bytes that are not HTTP/2 (an HTTP/1.1 response, a frame header announcing 16 MiB of an
/// unknown type, a PING before any SETTINGS): no connection ever becomes Ready, the pool
/// reports TRANSIENT_FAILURE and keeps trying, a call fails fast with UNAVAILABLE, and
/// nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_http2_is_a_transient_failure() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        let garbage = match peer.index() % 3 {
            0 => b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_vec(),
            1 => vec![0xff; 64],
            _ => support::hostile::encode(kind::PING, 0, 0, &[1; 8]),
        };
        peer.send_raw(&garbage).await?;
        peer.read_until_closed().await;
        Ok(())
    });
    let pool = builder(&server.target()).build().unwrap();
    let failing = pool
        .wait_until(WAIT, |s| s.state == ConnectivityState::TransientFailure)
        .await;
    assert!(failing, "{:#?}", pool.snapshot());
    assert!(
        server.wait_until(WAIT, |r| r.accepted >= 4).await,
        "the pool keeps trying: {}",
        server.accepted()
    );
    assert_code(
        call(&pool, "anyone?").await,
        Code::Unavailable,
        "a call to a server that does not speak HTTP/2",
    );
    assert_eq!(connects(&pool), 0, "{:#?}", pool.snapshot());
    assert!(pool.snapshot().last_error.is_some());
    assert_settles(&pool).await;
    pool.close().await.unwrap();
}

/// Polls `future` once: whatever it can do without waiting, it does now.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *future).poll(cx))).await
}

/// Regression (a): a graceful shutdown's final GOAWAY names the last stream the server took,
/// and that beats the shutdown-PING cutoff. The server announces (GOAWAY max id, NO_ERROR),
/// pings; a call queued behind the stream limit opens its stream after our PING ack; the
/// final GOAWAY names that stream, and the server closes without answering it. The server
/// took it, so it must not be retried: it fails UNAVAILABLE, seen exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_goaway_beats_the_shutdown_ping_cutoff() {
    const PING: [u8; 8] = *b"shutdown";
    let seen = Seen::default();
    let (first_arrived, first_arrived_rx) = oneshot::channel::<()>();
    let (queued, queued_rx) = oneshot::channel::<()>();
    let signals = Arc::new(Mutex::new(Some((first_arrived, queued_rx))));
    let server = HostileServer::start({
        let seen = seen.clone();
        move |mut peer: Peer| {
            let seen = seen.clone();
            let signals = signals.clone();
            async move {
                if peer.index() > 0 {
                    peer.send_settings(&[]).await?;
                    loop {
                        let (id, body) = peer.expect_request().await?;
                        let request = seen.note(peer.index(), &body);
                        peer.send_ok(id, &reply_to(&request)).await?;
                    }
                }
                let (first_arrived, queued) = signals.lock().unwrap().take().expect("once");
                peer.send_settings(&[(setting::MAX_CONCURRENT_STREAMS, 1)])
                    .await?;
                let (first, body) = peer.expect_request().await?;
                let request = seen.note(0, &body);
                let _ = first_arrived.send(());
                let _ = queued.await;
                peer.send_goaway(MAX_STREAM_ID, code::NO_ERROR, b"").await?;
                peer.send_ping(PING).await?;
                peer.expect_ping_ack(PING).await?;
                // Only now may the queued call's stream open.
                peer.send_ok(first, &reply_to(&request)).await?;
                let (taken, body) = peer.expect_request().await?;
                seen.note(0, &body);
                peer.send_goaway(taken, code::NO_ERROR, b"").await?;
                Ok(())
            }
        }
    });
    let pool = ready_pool(&server).await;
    let limited = pool
        .wait_until(WAIT, |s| {
            s.endpoints[0].connections[0].max_concurrent_streams == Some(1)
        })
        .await;
    assert!(limited, "{:#?}", pool.snapshot());
    let first = tokio::spawn({
        let pool = pool.clone();
        async move { call_with(&pool, "first", WAIT, false).await }
    });
    tokio::time::timeout(WAIT, first_arrived_rx)
        .await
        .expect("the first call arrives")
        .unwrap();
    // The second call's first poll picks the only connection and queues its stream inside
    // HTTP/2 behind the first (the limit is 1, the pool may not grow): nothing on the wire.
    let mut second = Box::pin(call_with(&pool, "second", WAIT, false));
    assert!(poll_once(&mut second).await.is_pending());
    assert_eq!(pool.snapshot().in_flight(), 2, "{:#?}", pool.snapshot());
    queued.send(()).unwrap();
    first.await.unwrap().expect("the first call is answered");
    assert_code(
        second.await,
        Code::Unavailable,
        "a call the server took before it closed",
    );
    assert_eq!(seen.of("second"), vec![0], "sent exactly once");
    assert_settles(&pool).await;
    pool.close().await.unwrap();
}

/// Regression (b): a server that refuses every stream (RST_STREAM REFUSED_STREAM). gRFC A6
/// allows one transparent retry of a call that reached the server but not its application:
/// the server sees the call at most twice, the second time on the other connection, and
/// the call fails UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_stream_is_retried_at_most_once_on_another_connection() {
    let seen = Seen::default();
    let server = HostileServer::start({
        let seen = seen.clone();
        move |mut peer: Peer| {
            let seen = seen.clone();
            async move {
                peer.send_settings(&[]).await?;
                loop {
                    let (id, body) = peer.expect_request().await?;
                    seen.note(peer.index(), &body);
                    peer.send_rst(id, code::REFUSED_STREAM).await?;
                }
            }
        }
    });
    let pool = builder(&server.target())
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    support::common::wait_all_ready(&pool, 2).await;
    assert_code(
        call(&pool, "refused").await,
        Code::Unavailable,
        "a refused call",
    );
    let attempts = seen.of("refused");
    assert!(
        (1..=2).contains(&attempts.len()),
        "sent {} times: {attempts:?}",
        attempts.len()
    );
    if let [first, second] = attempts[..] {
        assert_ne!(first, second, "the retry goes to the other connection");
    }
    assert_settles(&pool).await;
    pool.close().await.unwrap();
}

/// Regression (c): the server ends the response (trailers with END_STREAM) while the
/// client's request stream is still open. The call ends with the server's status, the
/// client stops writing and closes its half with RST_STREAM(NO_ERROR) (RFC 9113 §8.1), and
/// nothing stays in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_before_our_end_stream_stop_the_request_with_no_error() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[]).await?;
        loop {
            let id = peer.expect_headers().await?;
            // Wait for the first message, so the client is mid-stream.
            let data = peer.expect(|f| f.is(kind::DATA) && f.stream == id).await?;
            match request_of(&data.payload).message.as_str() {
                "ok" => {
                    peer.send_ok(id, &reply_to(&request_of(&data.payload)))
                        .await?
                }
                _ => {
                    let mut fields = GRPC_RESPONSE.to_vec();
                    fields.extend([("grpc-status", "9"), ("grpc-message", "enough")]);
                    peer.send_headers(id, &fields, true).await?;
                }
            }
        }
    });
    let pool = ready_pool(&server).await;
    for (stream, message) in [(1, "ok"), (3, "fail")] {
        let (more, requests) = tokio::sync::mpsc::channel(4);
        more.send(echo(message)).await.unwrap();
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(requests));
        request.set_timeout(WAIT);
        let result = tokio::time::timeout(WAIT + SLACK, client(&pool).client_stream(request))
            .await
            .expect("the call ends");
        match message {
            "ok" => assert_eq!(result.unwrap().into_inner().message, "ok"),
            _ => assert_eq!(result.unwrap_err().code(), Code::FailedPrecondition),
        }
        // The caller keeps writing; none of it may go out.
        let _ = more.send(echo("more")).await;
        let reset = server
            .wait_until(WAIT, |r| {
                r.frames
                    .iter()
                    .any(|f| f.is(kind::RST_STREAM) && f.stream == stream)
            })
            .await;
        let frames = server.frames();
        assert!(reset, "stream {stream} never reset: {frames:?}");
        let ours: Vec<&Frame> = frames.iter().filter(|f| f.stream == stream).collect();
        let reset_at = ours
            .iter()
            .position(|f| f.is(kind::RST_STREAM))
            .expect("a reset");
        assert!(
            ours[reset_at].is_reset(stream, code::NO_ERROR),
            "stream {stream}: {:?}",
            ours[reset_at]
        );
        assert_eq!(
            ours.iter().filter(|f| f.is(kind::DATA)).count(),
            1,
            "stream {stream}: only the first message went out: {ours:?}"
        );
        assert_eq!(
            reset_at,
            ours.len() - 1,
            "nothing after the reset: {ours:?}"
        );
        assert_settles(&pool).await;
    }
    pool.close().await.unwrap();
}

/// Regression (d): a SETTINGS frame with more than 32 parameters (240 bytes) whose
/// MAX_CONCURRENT_STREAMS comes last: the pool still reads the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_with_more_than_32_parameters() {
    let server = HostileServer::start(|mut peer: Peer| async move {
        // Unknown parameters, which a receiver must ignore (RFC 9113 §6.5.2).
        let mut params: Vec<(u16, u32)> = (0..39).map(|i| (0xf000 + i, u32::from(i))).collect();
        params.push((setting::MAX_CONCURRENT_STREAMS, 7));
        peer.send_settings(&params).await?;
        serve_requests(&mut peer).await
    });
    let pool = ready_pool(&server).await;
    call(&pool, "fine").await.expect("a call");
    let snapshot = pool.snapshot();
    assert_eq!(
        snapshot.endpoints[0].connections[0].max_concurrent_streams,
        Some(7),
        "{snapshot:#?}"
    );
    pool.close().await.unwrap();
}

/// Regression (e): a storm of 5 000 calls cut after 1-5 ms, against a server that keeps
/// sending DATA on streams after the client reset them (late, once 100 newer resets have
/// arrived, so HTTP/2 no longer remembers those streams). The client must not count its
/// answers to those frames as errors of its own and tear the connection down (h2's default
/// limit of 1 024 "local error resets", GOAWAY ENHANCE_YOUR_CALM too_many_internal_resets):
/// no GOAWAY from the client, one connection throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_storm_keeps_the_connection() {
    const CALLS: usize = 5_000;
    const WORKERS: usize = 50;
    let server = HostileServer::start(|mut peer: Peer| async move {
        peer.send_settings(&[]).await?;
        let reply = support::hostile::grpc_frame(&reply_to(&echo("late")));
        let mut reset: VecDeque<u32> = VecDeque::new();
        loop {
            let frame = peer.next_frame().await?;
            match frame.kind {
                kind::HEADERS => {
                    peer.send_response_headers(frame.stream).await?;
                    peer.send_data(frame.stream, &reply, false).await?;
                }
                kind::RST_STREAM => {
                    reset.push_back(frame.stream);
                    if reset.len() > 100 {
                        let old = reset.pop_front().expect("not empty");
                        peer.send_data(old, &reply, false).await?;
                        peer.send_data(old, &reply, false).await?;
                    }
                }
                _ => {}
            }
        }
    });
    let pool = ready_pool(&server).await;
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let mut client = client(&pool);
        workers.push(tokio::spawn(async move {
            for i in 0..CALLS / WORKERS {
                let cut = Duration::from_millis(1 + ((w + i) % 5) as u64);
                let mut request = tonic::Request::new(echo("storm"));
                request.set_timeout(cut);
                // No trailers ever come: every call ends by its deadline or by being dropped.
                let _ = tokio::time::timeout(cut, client.unary(request)).await;
            }
        }));
    }
    for worker in workers {
        tokio::time::timeout(WAIT * 6, worker)
            .await
            .expect("the storm ends")
            .unwrap();
    }
    assert_settles(&pool).await;
    let recorded = server.recorded();
    println!(
        "storm: {} client resets, {} of them STREAM_CLOSED",
        recorded.count(|f| f.is(kind::RST_STREAM)),
        recorded.count(|f| f.is(kind::RST_STREAM) && f.error_code() == Some(code::STREAM_CLOSED))
    );
    if let Some(at) = recorded.frames.iter().position(|f| f.is(kind::GOAWAY)) {
        println!(
            "storm: GOAWAY after {} resets, {} frames; accepted {}",
            recorded.frames[..at]
                .iter()
                .filter(|f| f.is(kind::RST_STREAM))
                .count(),
            at,
            recorded.accepted
        );
    }
    let goaways: Vec<_> = recorded
        .goaways()
        .into_iter()
        .map(|g| {
            (
                g.error_code(),
                String::from_utf8_lossy(&g.payload[8..]).into_owned(),
            )
        })
        .collect();
    assert!(
        goaways.is_empty(),
        "the client closed the connection: {goaways:?}"
    );
    assert_eq!(server.accepted(), 1, "one connection throughout");
    assert_eq!(connects(&pool), 1);
    pool.close().await.unwrap();
}
