//! `hostile_server`: a real pool whose every connection is served by a fuzzer-written script
//! of HTTP/2 frames (valid, invalid, out of order, or plain garbage) over an in-memory pipe,
//! while a few gRPC calls with deadlines go through the pool.
//!
//! Invariants, checked on every input:
//! - nothing panics (libFuzzer aborts on any panic, in any task);
//! - every call's response future ends, with any result, by its deadline (on the paused
//!   clock: a hang is a timeout, not a stuck fuzzer); the harness reads the body until that
//!   same deadline and drops it, as a caller with a deadline does;
//! - once every call has ended, the pool counts no call in flight;
//! - `pool.close()` returns, and the pool then holds none of its connections' pipes (see
//!   [`Release`] for when).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;
use tower_service::Service;

use crate::input::{Input, Output};
use crate::pipe::{PipeConnector, Release, PIPE_CAPACITY};
use crate::wire::{self, flag, kind};

/// At most this many script operations are read from one input.
const MAX_OPS: usize = 512;
/// At most this many connections get a script; later connects are refused.
const MAX_CONNECTIONS: usize = 16;
/// How late a response future may end past its deadline: the timer wheel's 1 ms rounding.
const DEADLINE_SLACK: Duration = Duration::from_millis(2);

/// Pool settings the input chooses (its first byte), one bit each.
pub mod config {
    /// Two connections per endpoint instead of one.
    pub const TWO_CONNECTIONS: u8 = 1 << 0;
    /// HTTP/2 keepalive PINGs every second, also while idle, with a 1 s timeout.
    pub const KEEPALIVE: u8 = 1 << 1;
    /// Calls wait for a Ready connection even in TransientFailure.
    pub const WAIT_FOR_READY: u8 = 1 << 2;
    /// The endpoint may grow to 3 connections when its connections are full.
    pub const GROWTH: u8 = 1 << 3;
    /// Connects (pipe + handshake + server SETTINGS) must finish within 1 s.
    pub const CONNECT_TIMEOUT: u8 = 1 << 4;
    /// A pool-wide call timeout of 3 s on top of each call's own deadline.
    pub const POOL_TIMEOUT: u8 = 1 << 5;
    /// Small HTTP/2 flow-control windows (1 KiB per stream, 64 KiB per connection).
    pub const SMALL_WINDOWS: u8 = 1 << 6;
}

/// One call the harness makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallPlan {
    /// When it starts, after the pool is built (input byte × 10 ms).
    pub delay: Duration,
    /// Its deadline, sent as `grpc-timeout` (1 ms + input byte × 20 ms).
    pub deadline: Duration,
}

/// A header field of a scripted HEADERS frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    /// `:status: 200`, indexed.
    Status200,
    /// `:status` with any value.
    Status(Vec<u8>),
    /// `content-type: application/grpc`.
    ContentTypeGrpc,
    /// `grpc-status` with a decimal code.
    GrpcStatus(u8),
    /// `grpc-message` with any value.
    GrpcMessage(Vec<u8>),
    /// Any name and value, as literals.
    Literal(Vec<u8>, Vec<u8>),
    /// Raw HPACK bytes (indices, table size updates, truncated literals...).
    RawHpack(Vec<u8>),
}

/// The payload of a scripted DATA frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Bytes as they are.
    Raw(Vec<u8>),
    /// A gRPC message whose length prefix may lie.
    Grpc {
        /// The compressed flag.
        compressed: bool,
        /// The length the prefix claims, if not the real one.
        declared: Option<u32>,
        /// The message.
        message: Vec<u8>,
    },
}

/// One step of a server script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// SETTINGS (an ack, or parameters with any ids and values).
    Settings {
        /// The ACK flag.
        ack: bool,
        /// Parameters.
        params: Vec<(u16, u32)>,
    },
    /// SETTINGS with only MAX_CONCURRENT_STREAMS.
    MaxConcurrentStreams(u32),
    /// PING.
    Ping {
        /// The ACK flag.
        ack: bool,
        /// Opaque data.
        data: [u8; 8],
    },
    /// GOAWAY.
    GoAway {
        /// The last stream id.
        last_stream: u32,
        /// The error code.
        code: u32,
        /// Debug data.
        debug: Vec<u8>,
    },
    /// RST_STREAM.
    RstStream {
        /// Its stream.
        stream: u32,
        /// Its error code.
        code: u32,
    },
    /// HEADERS with a hand-encoded HPACK block.
    Headers {
        /// Its stream.
        stream: u32,
        /// The END_STREAM flag (trailers).
        end_stream: bool,
        /// The END_HEADERS flag (without it a CONTINUATION must follow).
        end_headers: bool,
        /// The fields.
        fields: Vec<Field>,
    },
    /// DATA.
    Data {
        /// Its stream.
        stream: u32,
        /// The END_STREAM flag.
        end_stream: bool,
        /// The payload.
        payload: Payload,
    },
    /// WINDOW_UPDATE.
    WindowUpdate {
        /// Its stream (0: the connection).
        stream: u32,
        /// The increment (0 is a protocol error).
        increment: u32,
    },
    /// Bytes that need not be frames.
    Garbage(Vec<u8>),
    /// Any frame type with any flags (CONTINUATION, PUSH_PROMISE, PRIORITY, unknown...).
    RawFrame {
        /// Frame type.
        kind: u8,
        /// Flags.
        flags: u8,
        /// Stream.
        stream: u32,
        /// Payload.
        payload: Vec<u8>,
    },
    /// Close this connection; the ops after it script the next connection.
    Close,
    /// Wait this long (on the paused clock) before the next op.
    Pause(Duration),
    /// Stop reading what the client sends (its writes back up once the pipe is full).
    StopReading,
    /// Keep this connection open and silent; the ops after it script the next connection.
    Hold,
}

/// A decoded input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The [`config`] bits.
    pub config: u8,
    /// The calls.
    pub calls: Vec<CallPlan>,
    /// One script per connection, in connect order.
    pub connections: Vec<Vec<Op>>,
}

fn read_stream(input: &mut Input<'_>) -> u32 {
    match input.u8() {
        // Mostly client-initiated ids: the pool's calls use 1, 3, 5...
        b @ 0..=0x7f => 2 * u32::from(b) + 1,
        0x80 => 0,
        _ => input.u32(),
    }
}

fn write_stream(out: &mut Output, stream: u32) {
    if stream % 2 == 1 && stream <= 255 {
        out.u8(((stream - 1) / 2) as u8);
    } else if stream == 0 {
        out.u8(0x80);
    } else {
        out.u8(0xff).u32(stream);
    }
}

fn read_short(input: &mut Input<'_>, max: usize) -> Vec<u8> {
    let n = usize::from(input.u8()) % (max + 1);
    input.bytes(n)
}

fn write_short(out: &mut Output, bytes: &[u8]) {
    out.u8(bytes.len() as u8).raw(bytes);
}

impl Field {
    fn decode(input: &mut Input<'_>) -> Self {
        match input.u8() % 7 {
            0 => Field::Status200,
            1 => Field::Status(read_short(input, 8)),
            2 => Field::ContentTypeGrpc,
            3 => Field::GrpcStatus(input.u8()),
            4 => Field::GrpcMessage(read_short(input, 64)),
            5 => Field::Literal(read_short(input, 32), read_short(input, 64)),
            _ => Field::RawHpack(read_short(input, 32)),
        }
    }

    fn encode(&self, out: &mut Output) {
        match self {
            Field::Status200 => {
                out.u8(0);
            }
            Field::Status(v) => write_short(out.u8(1), v),
            Field::ContentTypeGrpc => {
                out.u8(2);
            }
            Field::GrpcStatus(code) => {
                out.u8(3).u8(*code);
            }
            Field::GrpcMessage(v) => write_short(out.u8(4), v),
            Field::Literal(n, v) => {
                write_short(out.u8(5), n);
                write_short(out, v);
            }
            Field::RawHpack(b) => write_short(out.u8(6), b),
        }
    }

    fn hpack(&self, block: &mut Vec<u8>) {
        match self {
            Field::Status200 => block.push(wire::HPACK_STATUS_200),
            Field::Status(v) => wire::hpack_literal(block, b":status", v),
            Field::ContentTypeGrpc => {
                wire::hpack_literal(block, b"content-type", b"application/grpc")
            }
            Field::GrpcStatus(code) => {
                wire::hpack_literal(block, b"grpc-status", code.to_string().as_bytes())
            }
            Field::GrpcMessage(v) => wire::hpack_literal(block, b"grpc-message", v),
            Field::Literal(n, v) => wire::hpack_literal(block, n, v),
            Field::RawHpack(b) => block.extend_from_slice(b),
        }
    }
}

impl Op {
    const COUNT: u8 = 14;

    /// Reads one op.
    pub fn decode(input: &mut Input<'_>) -> Self {
        match input.u8() % Self::COUNT {
            0 => {
                let ack = input.u8() & 1 == 1;
                let n = input.u8() % 8;
                let params = (0..n)
                    .map(|_| (u16::from(input.u8()), input.u32()))
                    .collect();
                Op::Settings { ack, params }
            }
            1 => Op::MaxConcurrentStreams(u32::from(input.u8())),
            2 => {
                let ack = input.u8() & 1 == 1;
                let mut data = [0u8; 8];
                data.iter_mut().for_each(|b| *b = input.u8());
                Op::Ping { ack, data }
            }
            3 => Op::GoAway {
                last_stream: read_stream(input),
                code: u32::from(input.u8()),
                debug: read_short(input, 32),
            },
            4 => Op::RstStream {
                stream: read_stream(input),
                code: u32::from(input.u8()),
            },
            5 => {
                let stream = read_stream(input);
                let flags = input.u8();
                let n = input.u8() % 8;
                Op::Headers {
                    stream,
                    end_stream: flags & 1 == 1,
                    end_headers: flags & 2 == 0,
                    fields: (0..n).map(|_| Field::decode(input)).collect(),
                }
            }
            6 => {
                let stream = read_stream(input);
                let flags = input.u8();
                let payload = if flags & 2 == 0 {
                    Payload::Raw(read_short(input, 255))
                } else {
                    Payload::Grpc {
                        compressed: flags & 4 != 0,
                        declared: (flags & 8 != 0).then(|| input.u32()),
                        message: read_short(input, 255),
                    }
                };
                Op::Data {
                    stream,
                    end_stream: flags & 1 == 1,
                    payload,
                }
            }
            7 => Op::WindowUpdate {
                stream: read_stream(input),
                increment: input.u32(),
            },
            8 => Op::Garbage(read_short(input, 255)),
            9 => Op::RawFrame {
                kind: input.u8(),
                flags: input.u8(),
                stream: read_stream(input),
                payload: read_short(input, 255),
            },
            10 => Op::Close,
            11 => Op::Pause(Duration::from_millis(u64::from(input.u8()) * 10)),
            12 => Op::StopReading,
            _ => Op::Hold,
        }
    }

    /// Writes the op as [`Op::decode`] reads it.
    pub fn encode(&self, out: &mut Output) {
        match self {
            Op::Settings { ack, params } => {
                out.u8(0).u8(u8::from(*ack)).u8(params.len() as u8);
                for (id, value) in params {
                    out.u8(*id as u8).u32(*value);
                }
            }
            Op::MaxConcurrentStreams(n) => {
                out.u8(1).u8(*n as u8);
            }
            Op::Ping { ack, data } => {
                out.u8(2).u8(u8::from(*ack)).raw(data);
            }
            Op::GoAway {
                last_stream,
                code,
                debug,
            } => {
                out.u8(3);
                write_stream(out, *last_stream);
                out.u8(*code as u8);
                write_short(out, debug);
            }
            Op::RstStream { stream, code } => {
                out.u8(4);
                write_stream(out, *stream);
                out.u8(*code as u8);
            }
            Op::Headers {
                stream,
                end_stream,
                end_headers,
                fields,
            } => {
                out.u8(5);
                write_stream(out, *stream);
                out.u8(u8::from(*end_stream) | if *end_headers { 0 } else { 2 })
                    .u8(fields.len() as u8);
                fields.iter().for_each(|f| f.encode(out));
            }
            Op::Data {
                stream,
                end_stream,
                payload,
            } => {
                out.u8(6);
                write_stream(out, *stream);
                let end = u8::from(*end_stream);
                match payload {
                    Payload::Raw(bytes) => write_short(out.u8(end), bytes),
                    Payload::Grpc {
                        compressed,
                        declared,
                        message,
                    } => {
                        let flags = end
                            | 2
                            | if *compressed { 4 } else { 0 }
                            | if declared.is_some() { 8 } else { 0 };
                        out.u8(flags);
                        if let Some(len) = declared {
                            out.u32(*len);
                        }
                        write_short(out, message);
                    }
                }
            }
            Op::WindowUpdate { stream, increment } => {
                out.u8(7);
                write_stream(out, *stream);
                out.u32(*increment);
            }
            Op::Garbage(bytes) => write_short(out.u8(8), bytes),
            Op::RawFrame {
                kind,
                flags,
                stream,
                payload,
            } => {
                out.u8(9).u8(*kind).u8(*flags);
                write_stream(out, *stream);
                write_short(out, payload);
            }
            Op::Close => {
                out.u8(10);
            }
            Op::Pause(d) => {
                out.u8(11).u8((d.as_millis() / 10) as u8);
            }
            Op::StopReading => {
                out.u8(12);
            }
            Op::Hold => {
                out.u8(13);
            }
        }
    }

    /// The bytes this op puts on the wire, if it writes any.
    fn wire(&self) -> Option<Vec<u8>> {
        Some(match self {
            Op::Settings { ack, params } => {
                if *ack {
                    wire::frame(kind::SETTINGS, flag::ACK, 0, &[])
                } else {
                    wire::settings(params)
                }
            }
            Op::MaxConcurrentStreams(n) => {
                wire::settings(&[(wire::SETTINGS_MAX_CONCURRENT_STREAMS, *n)])
            }
            Op::Ping { ack, data } => {
                wire::frame(kind::PING, if *ack { flag::ACK } else { 0 }, 0, data)
            }
            Op::GoAway {
                last_stream,
                code,
                debug,
            } => {
                let mut payload = last_stream.to_be_bytes().to_vec();
                payload.extend_from_slice(&code.to_be_bytes());
                payload.extend_from_slice(debug);
                wire::frame(kind::GOAWAY, 0, 0, &payload)
            }
            Op::RstStream { stream, code } => {
                wire::frame(kind::RST_STREAM, 0, *stream, &code.to_be_bytes())
            }
            Op::Headers {
                stream,
                end_stream,
                end_headers,
                fields,
            } => {
                let mut block = Vec::new();
                fields.iter().for_each(|f| f.hpack(&mut block));
                let flags = if *end_stream { flag::END_STREAM } else { 0 }
                    | if *end_headers { flag::END_HEADERS } else { 0 };
                wire::frame(kind::HEADERS, flags, *stream, &block)
            }
            Op::Data {
                stream,
                end_stream,
                payload,
            } => {
                let bytes = match payload {
                    Payload::Raw(bytes) => bytes.clone(),
                    Payload::Grpc {
                        compressed,
                        declared,
                        message,
                    } => {
                        let mut m = wire::grpc_message(*compressed, message);
                        if let Some(len) = declared {
                            m[1..5].copy_from_slice(&len.to_be_bytes());
                        }
                        m
                    }
                };
                let flags = if *end_stream { flag::END_STREAM } else { 0 };
                wire::frame(kind::DATA, flags, *stream, &bytes)
            }
            Op::WindowUpdate { stream, increment } => {
                wire::frame(kind::WINDOW_UPDATE, 0, *stream, &increment.to_be_bytes())
            }
            Op::Garbage(bytes) => bytes.clone(),
            Op::RawFrame {
                kind,
                flags,
                stream,
                payload,
            } => wire::frame(*kind, *flags, *stream, payload),
            Op::Close | Op::Pause(_) | Op::StopReading | Op::Hold => return None,
        })
    }
}

impl Plan {
    /// Decodes any input into a plan.
    pub fn decode(data: &[u8]) -> Self {
        let mut input = Input::new(data);
        let config = input.u8();
        let calls = (0..input.u8() % 5)
            .map(|_| CallPlan {
                delay: Duration::from_millis(u64::from(input.u8()) * 10),
                deadline: Duration::from_millis(1 + u64::from(input.u8()) * 20),
            })
            .collect();
        let mut connections = vec![Vec::new()];
        for _ in 0..MAX_OPS {
            if input.is_empty() || connections.len() > MAX_CONNECTIONS {
                break;
            }
            let op = Op::decode(&mut input);
            let ends_script = matches!(op, Op::Close | Op::Hold);
            connections.last_mut().expect("never empty").push(op);
            if ends_script {
                connections.push(Vec::new());
            }
        }
        // A script ended by Close or Hold with nothing after it leaves later connects refused.
        if connections.len() > 1 && connections.last().is_some_and(Vec::is_empty) {
            connections.pop();
        }
        connections.truncate(MAX_CONNECTIONS);
        Self {
            config,
            calls,
            connections,
        }
    }

    /// Encodes the plan as [`Plan::decode`] reads it (calls' times rounded down to its
    /// steps). Every script but the last must end with [`Op::Close`] or [`Op::Hold`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Output::default();
        out.u8(self.config).u8(self.calls.len() as u8);
        for call in &self.calls {
            out.u8((call.delay.as_millis() / 10) as u8).u8((call
                .deadline
                .as_millis()
                .saturating_sub(1)
                / 20) as u8);
        }
        let last = self.connections.len().saturating_sub(1);
        for (i, script) in self.connections.iter().enumerate() {
            assert!(
                i == last || matches!(script.last(), Some(Op::Close | Op::Hold)),
                "script {i} ends neither with Close nor Hold"
            );
            script.iter().for_each(|op| op.encode(&mut out));
        }
        out.bytes
    }
}

/// Plays one script as the server end of a connection.
async fn serve(io: DuplexStream, script: Vec<Op>) {
    let (mut from_client, mut to_client) = tokio::io::split(io);
    // Reads (and drops) what the client sends, so that its writes never back up unless the
    // script says so.
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while matches!(from_client.read(&mut buf).await, Ok(n) if n > 0) {}
        from_client
    });
    let mut closed = false;
    for op in script {
        match op {
            Op::Close => {
                closed = true;
                break;
            }
            Op::Hold => break,
            Op::Pause(d) => tokio::time::sleep(d).await,
            Op::StopReading => reader.abort(),
            op => {
                let bytes = op.wire().expect("every other op writes");
                if to_client.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
    }
    if closed {
        reader.abort();
        let _ = to_client.shutdown().await;
        return;
    }
    // Script over: the connection stays open, silent, until the client closes it.
    let _ = reader.await;
}

fn request(deadline: Duration) -> http::Request<tonic::body::Body> {
    let message = Bytes::from(wire::grpc_message(false, b"fuzz"));
    http::Request::builder()
        .method(http::Method::POST)
        .uri("/fuzz.Fuzz/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", format!("{}m", deadline.as_millis()))
        .body(tonic::body::Body::new(http_body_util::Full::new(message)))
        .expect("a valid request")
}

/// Runs one input: builds the pool, makes the calls, checks the invariants (panics if one
/// does not hold).
pub fn run(data: &[u8]) {
    run_with(data, Release::AtCloseReturn);
}

/// Runs one input, checking that the closed pool holds no pipe by the time `release` says.
pub fn run_with(data: &[u8], release: Release) {
    let plan = Plan::decode(data);
    crate::paused_runtime().block_on(run_plan(plan, release));
}

async fn run_plan(plan: Plan, release: Release) {
    let scripts = Arc::new(Mutex::new(VecDeque::from(plan.connections)));
    let connector = PipeConnector::new(move |_dst| {
        let script = scripts
            .lock()
            .expect("not poisoned")
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        let (client, server) = tokio::io::duplex(PIPE_CAPACITY);
        tokio::spawn(serve(server, script));
        Ok(client)
    });
    let c = plan.config;
    let mut builder = tonic_pool::Pool::builder("static:///127.0.0.1:50051")
        .connector(connector.clone())
        .connections_per_endpoint(if c & config::TWO_CONNECTIONS != 0 {
            2
        } else {
            1
        })
        .wait_for_ready(c & config::WAIT_FOR_READY != 0)
        .close_timeout(Duration::from_secs(5))
        .drain_timeout(Duration::from_secs(5));
    if c & config::KEEPALIVE != 0 {
        builder = builder
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true);
    }
    if c & config::GROWTH != 0 {
        builder = builder.max_connections_per_endpoint(3);
    }
    if c & config::CONNECT_TIMEOUT != 0 {
        builder = builder.connect_timeout(Duration::from_secs(1));
    }
    if c & config::POOL_TIMEOUT != 0 {
        builder = builder.timeout(Duration::from_secs(3));
    }
    if c & config::SMALL_WINDOWS != 0 {
        builder = builder
            .initial_stream_window_size(1024)
            .initial_connection_window_size(64 * 1024);
    }
    let pool = builder.build().expect("a valid configuration");

    let calls: Vec<_> = plan
        .calls
        .into_iter()
        .enumerate()
        .map(|(i, call)| {
            let mut pool = pool.clone();
            tokio::spawn(async move {
                tokio::time::sleep(call.delay).await;
                let start = Instant::now();
                let response = pool.call(request(call.deadline));
                let Ok(result) =
                    tokio::time::timeout_at(start + call.deadline + DEADLINE_SLACK, response).await
                else {
                    panic!(
                        "call {i} had no answer by its deadline of {:?}",
                        call.deadline
                    );
                };
                match result {
                    Ok(response) => {
                        // The caller's deadline bounds the body too; past it it is dropped.
                        let status = response.status();
                        let body = response.into_body().collect();
                        let body = tokio::time::timeout_at(start + call.deadline, body).await;
                        if crate::tracing() {
                            let body = body.map(|b| b.map(|b| b.trailers().cloned()));
                            eprintln!(
                                "call {i} after {:?}: {status}, body {body:?}",
                                start.elapsed()
                            );
                        }
                    }
                    Err(e) if crate::tracing() => {
                        eprintln!("call {i} after {:?}: {e}", start.elapsed())
                    }
                    Err(_) => {}
                }
            })
        })
        .collect();
    for call in calls {
        if let Err(e) = call.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    if crate::tracing() {
        eprintln!("{:#?}", pool.snapshot());
    }
    let in_flight = pool.snapshot().in_flight();
    assert_eq!(
        in_flight, 0,
        "calls counted in flight after every call ended"
    );
    let closed = tokio::time::timeout(Duration::from_secs(60), pool.close()).await;
    let result = closed.expect("close() returned");
    if crate::tracing() {
        eprintln!("close: {result:?}; pipes held: {}", connector.live());
    }
    if let Err(e) = &result {
        assert!(
            !format!("{e:?}").contains("panicked"),
            "a pool task panicked: {e:?}"
        );
    }
    connector.assert_released(release).await;
}
