//! The seed corpora in `corpus/<target>/`, written from readable plans. Regenerate them with
//! `cargo test --lib seeds -- --ignored` (in `fuzz/`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use crate::hostile_server::{config, CallPlan, Field, Op, Payload, Plan as ServerPlan};
use crate::resolver_answers::{Answer, Plan as ResolverPlan};

const ENHANCE_YOUR_CALM: u32 = 0xb;
const REFUSED_STREAM: u32 = 0x7;

fn call(delay_ms: u64, deadline_ms: u64) -> CallPlan {
    CallPlan {
        delay: Duration::from_millis(delay_ms),
        deadline: Duration::from_millis(deadline_ms),
    }
}

fn settings() -> Op {
    Op::Settings {
        ack: false,
        params: vec![],
    }
}

fn settings_ack() -> Op {
    Op::Settings {
        ack: true,
        params: vec![],
    }
}

fn response_headers(stream: u32) -> Op {
    Op::Headers {
        stream,
        end_stream: false,
        end_headers: true,
        fields: vec![Field::Status200, Field::ContentTypeGrpc],
    }
}

fn message(stream: u32) -> Op {
    Op::Data {
        stream,
        end_stream: false,
        payload: Payload::Grpc {
            compressed: false,
            declared: None,
            message: b"pong".to_vec(),
        },
    }
}

fn trailers(stream: u32, code: u8) -> Op {
    Op::Headers {
        stream,
        end_stream: true,
        end_headers: true,
        fields: vec![
            Field::GrpcStatus(code),
            Field::GrpcMessage(b"done".to_vec()),
        ],
    }
}

fn ok_call(stream: u32) -> Vec<Op> {
    vec![
        response_headers(stream),
        message(stream),
        trailers(stream, 0),
    ]
}

fn hostile_server_seeds() -> Vec<(&'static str, ServerPlan)> {
    let pause = |ms| Op::Pause(Duration::from_millis(ms));
    vec![
        (
            "ok_call",
            ServerPlan {
                config: 0,
                calls: vec![call(0, 1001)],
                connections: vec![
                    [vec![settings(), settings_ack(), pause(10)], ok_call(1)].concat()
                ],
            },
        ),
        (
            "goaway_then_reconnect",
            ServerPlan {
                config: config::CONNECT_TIMEOUT,
                calls: vec![call(0, 2001), call(0, 2001)],
                connections: vec![
                    vec![
                        settings(),
                        pause(20),
                        Op::GoAway {
                            last_stream: 0,
                            code: 0,
                            debug: b"bye".to_vec(),
                        },
                        pause(10),
                        Op::Close,
                    ],
                    [vec![settings(), pause(50)], ok_call(1), ok_call(3)].concat(),
                ],
            },
        ),
        (
            "refused_stream",
            ServerPlan {
                config: 0,
                calls: vec![call(0, 1001)],
                connections: vec![[
                    vec![
                        settings(),
                        pause(10),
                        Op::RstStream {
                            stream: 1,
                            code: REFUSED_STREAM,
                        },
                        pause(10),
                    ],
                    ok_call(3),
                ]
                .concat()],
            },
        ),
        (
            "stream_limit_growth",
            ServerPlan {
                config: config::GROWTH | config::TWO_CONNECTIONS,
                calls: vec![
                    call(10, 3001),
                    call(10, 3001),
                    call(10, 3001),
                    call(20, 3001),
                ],
                connections: vec![
                    [
                        vec![Op::MaxConcurrentStreams(1), pause(100)],
                        ok_call(1),
                        vec![Op::Hold],
                    ]
                    .concat(),
                    [
                        vec![Op::MaxConcurrentStreams(1), pause(200)],
                        ok_call(1),
                        vec![Op::Hold],
                    ]
                    .concat(),
                    [vec![Op::MaxConcurrentStreams(1), pause(300)], ok_call(1)].concat(),
                ],
            },
        ),
        (
            "garbage_then_close",
            ServerPlan {
                config: config::CONNECT_TIMEOUT,
                calls: vec![call(0, 501)],
                connections: vec![
                    vec![
                        Op::Garbage(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
                        Op::Close,
                    ],
                    vec![
                        settings(),
                        Op::Garbage(vec![0, 0, 4, 0xff, 0, 0, 0, 0, 1]),
                        Op::Close,
                    ],
                ],
            },
        ),
        (
            "keepalive_unanswered",
            ServerPlan {
                config: config::KEEPALIVE | config::WAIT_FOR_READY,
                calls: vec![call(0, 5001)],
                connections: vec![
                    vec![settings(), Op::StopReading, pause(2000), Op::Close],
                    vec![
                        settings(),
                        Op::Ping {
                            ack: false,
                            data: *b"12345678",
                        },
                        Op::GoAway {
                            last_stream: 0,
                            code: ENHANCE_YOUR_CALM,
                            debug: b"too_many_pings".to_vec(),
                        },
                        Op::Close,
                    ],
                ],
            },
        ),
        (
            "lying_body",
            ServerPlan {
                config: config::SMALL_WINDOWS | config::POOL_TIMEOUT,
                calls: vec![call(0, 4001), call(0, 4001)],
                connections: vec![vec![
                    settings(),
                    pause(10),
                    response_headers(1),
                    Op::Data {
                        stream: 1,
                        end_stream: false,
                        payload: Payload::Grpc {
                            compressed: true,
                            declared: Some(u32::MAX),
                            message: vec![0xab; 64],
                        },
                    },
                    Op::Headers {
                        stream: 3,
                        end_stream: false,
                        end_headers: false,
                        fields: vec![Field::Status200],
                    },
                    Op::RawFrame {
                        kind: 0x9,
                        flags: 0x4,
                        stream: 3,
                        payload: vec![0x00, 0x01, b'x', 0x7f, 0xff],
                    },
                    Op::WindowUpdate {
                        stream: 0,
                        increment: 0,
                    },
                ]],
            },
        ),
        (
            "bad_headers",
            ServerPlan {
                config: 0,
                calls: vec![call(0, 1001), call(0, 1001)],
                connections: vec![vec![
                    settings(),
                    pause(10),
                    Op::Headers {
                        stream: 1,
                        end_stream: true,
                        end_headers: true,
                        fields: vec![
                            Field::Status(b"99999".to_vec()),
                            Field::Literal(b"Upper-Case".to_vec(), b"\0".to_vec()),
                        ],
                    },
                    Op::Headers {
                        stream: 3,
                        end_stream: true,
                        end_headers: true,
                        fields: vec![Field::RawHpack(vec![0xbf, 0xff, 0xff, 0xff, 0x0f])],
                    },
                ]],
            },
        ),
    ]
}

fn v4(b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, b, c, d)), port)
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)
}

fn resolver_answers_seeds() -> Vec<(&'static str, ResolverPlan)> {
    // Port % 4: 0 refuses, 1 and 2 serve SETTINGS, 3 stays silent.
    vec![
        (
            "replace_one",
            ResolverPlan {
                connections_per_endpoint: 2,
                answers: vec![
                    Answer::Addresses(vec![v4(0, 0, 1, 50001)], 1),
                    Answer::Addresses(vec![v4(0, 0, 2, 50002)], 1),
                ],
            },
        ),
        (
            "errors_and_empty_keep_last_good",
            ResolverPlan {
                connections_per_endpoint: 1,
                answers: vec![
                    Answer::Error(b"SERVFAIL".to_vec()),
                    Answer::Addresses(vec![v4(0, 0, 1, 50001), v6(50002)], 2),
                    Answer::Addresses(vec![], 0),
                    Answer::Error(b"timeout".to_vec()),
                    Answer::Addresses(vec![v6(50002)], 0),
                ],
            },
        ),
        (
            "duplicates_and_mixed",
            ResolverPlan {
                connections_per_endpoint: 3,
                answers: vec![
                    Answer::Addresses(
                        vec![
                            v4(1, 2, 3, 50000),
                            v4(1, 2, 3, 50000),
                            v6(50001),
                            v6(50001),
                            v4(1, 2, 3, 50003),
                        ],
                        255,
                    ),
                    Answer::Addresses(vec![v4(1, 2, 3, 50000), v6(50003)], 0),
                ],
            },
        ),
        (
            "thousands",
            ResolverPlan {
                connections_per_endpoint: 1,
                answers: vec![
                    Answer::Many {
                        count: 1500,
                        seed: 7,
                        dup_every: 10,
                        port_base: 40001,
                        ttl: 1,
                    },
                    Answer::Addresses(vec![v4(7, 0, 1, 40002)], 1),
                    Answer::Many {
                        count: 200,
                        seed: 8,
                        dup_every: 0,
                        port_base: 1,
                        ttl: 3,
                    },
                ],
            },
        ),
        (
            "flapping",
            ResolverPlan {
                connections_per_endpoint: 2,
                answers: vec![
                    Answer::Addresses(vec![v4(0, 0, 1, 1), v4(0, 0, 2, 2)], 1),
                    Answer::Addresses(vec![v4(0, 0, 2, 2)], 1),
                    Answer::Addresses(vec![v4(0, 0, 1, 1), v4(0, 0, 2, 2)], 1),
                    Answer::Addresses(vec![v4(0, 0, 1, 1)], 1),
                    Answer::Addresses(vec![v4(0, 0, 3, 4), v4(0, 0, 4, 7)], 1),
                ],
            },
        ),
    ]
}

/// Target strings, one per grammar form (loopback and `localhost` only).
fn target_parse_seeds() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("dns_triple_slash", "dns:///localhost:50051"),
        ("dns_with_server", "dns://127.0.0.53:5353/localhost:50051"),
        ("dns_short", "dns:localhost"),
        ("bare_host_port", "localhost:50051"),
        ("http", "http://127.0.0.1:8080"),
        ("https_v6", "https://[::1]"),
        ("static_list", "static:///127.0.0.2:50051,[::1]:50051"),
        ("ipv4_list", "ipv4:127.0.0.1,127.0.0.2:50051"),
        ("ipv6_list", "ipv6:[::1]:50051,[::1]"),
    ]
    .into_iter()
    .map(|(name, target)| (name, target.as_bytes().to_vec()))
    .collect()
}

/// Frame streams for the frame reader: the first byte says where the input splits between
/// its two chunk sizes (see `fuzz_feed` in the crate's `frames.rs`).
fn frames_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::wire::{self, flag, kind};
    let goaway = |last: u32, code: u32| {
        let mut p = last.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(b"debug");
        wire::frame(kind::GOAWAY, 0, 0, &p)
    };
    let handshake = [
        wire::PREFACE.to_vec(),
        wire::settings(&[(wire::SETTINGS_MAX_CONCURRENT_STREAMS, 100)]),
        wire::frame(kind::SETTINGS, flag::ACK, 0, &[]),
    ]
    .concat();
    let mut headers = Vec::new();
    crate::wire::hpack_literal(&mut headers, b":path", b"/fuzz.Fuzz/Call");
    vec![
        ("handshake", [vec![30], handshake.clone()].concat()),
        (
            "ping_and_goaway",
            [
                vec![9],
                handshake.clone(),
                wire::frame(kind::PING, 0, 0, b"12345678"),
                wire::frame(kind::PING, flag::ACK, 0, b"12345678"),
                goaway(1, 0),
                goaway(0, ENHANCE_YOUR_CALM),
            ]
            .concat(),
        ),
        (
            "streams_and_resets",
            [
                vec![50],
                handshake,
                wire::frame(kind::HEADERS, flag::END_HEADERS, 1, &headers),
                wire::frame(
                    kind::DATA,
                    flag::END_STREAM,
                    1,
                    &wire::grpc_message(false, b"x"),
                ),
                wire::frame(kind::RST_STREAM, 0, 3, &REFUSED_STREAM.to_be_bytes()),
                wire::frame(kind::WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()),
            ]
            .concat(),
        ),
        (
            "truncated_frame",
            vec![3, 0, 0, 0x10, kind::SETTINGS, 0, 0, 0, 0, 0, 3],
        ),
    ]
}

fn write(target: &str, seeds: Vec<(&str, Vec<u8>)>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).expect("seed written");
    }
}

/// The encoders round-trip through the decoders: the seeds mean what their plans say.
#[test]
fn seeds_decode_to_their_plans() {
    for (name, plan) in hostile_server_seeds() {
        assert_eq!(ServerPlan::decode(&plan.encode()), plan, "{name}");
    }
    for (name, plan) in resolver_answers_seeds() {
        assert_eq!(ResolverPlan::decode(&plan.encode()), plan, "{name}");
    }
}

/// Writes the seed corpora (run on purpose, with `--ignored`).
#[test]
#[ignore = "writes corpus/ files; run with --ignored to regenerate the seeds"]
fn write_seed_corpora() {
    write("target_parse", target_parse_seeds());
    write("frames", frames_seeds());
    write(
        "hostile_server",
        hostile_server_seeds()
            .into_iter()
            .map(|(n, p)| (n, p.encode()))
            .collect(),
    );
    write(
        "resolver_answers",
        resolver_answers_seeds()
            .into_iter()
            .map(|(n, p)| (n, p.encode()))
            .collect(),
    );
}
