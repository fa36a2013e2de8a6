//! `resolver_answers`: a pool whose resolver returns fuzzer-chosen answers, one per call:
//! errors, empty sets, duplicates, thousands of addresses, IPv4 (inside 127.0.0.0/8) and IPv6
//! (`::1`) mixed, with any ports and TTLs. Connections are in-memory pipes: by its port, an
//! address refuses, serves SETTINGS (becomes Ready), or stays silent until the connect timeout.
//! The paused clock drives re-resolution (TTL clamped to 1..=4 s, early re-resolution after
//! connection failures at most every second).
//!
//! Invariants, checked after each answer is applied and at the end:
//! - nothing panics;
//! - the active (not draining) endpoints are exactly the addresses of the last good
//!   (non-empty) answer, each once, each with its configured number of connections; removed
//!   addresses are draining or gone;
//! - the resolver is asked again within a bounded (paused) time after each answer;
//! - `pool.close()` returns and the pool then holds none of its connections' pipes (see
//!   [`Release`] for when).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tonic_pool::resolve::{BoxFuture, Resolution, Resolve, ResolveError};
use tonic_pool::target::Target;

use crate::input::{Input, Output};
use crate::pipe::{PipeConnector, Release, PIPE_CAPACITY};
use crate::wire;

/// At most this many answers are read from one input.
const MAX_STEPS: usize = 12;
/// The largest generated ("thousands") answer.
const MAX_BIG_ANSWER: u16 = 2048;
/// How long the harness waits (paused clock) for the pool to ask its resolver again: past the
/// TTL ceiling and the longest resolution backoff (BackoffConfig's default 120 s cap + jitter).
const NEXT_RESOLUTION_WITHIN: Duration = Duration::from_secs(300);

/// One scripted resolver answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A resolution error.
    Error(Vec<u8>),
    /// These addresses (as listed: duplicates and all) with a TTL in seconds.
    Addresses(Vec<SocketAddr>, u8),
    /// `count` generated addresses, v4 and v6 mixed, every `dup_every`-th one repeating the
    /// one before, ports from `port_base` (the "thousands" case): only one answer of an input
    /// may list 256 or more.
    Many {
        /// How many addresses (capped at 2048). Encoded as a u16: with its top bit set the
        /// count is up to 2048, else below 256, so that most mutations stay cheap (a pool with
        /// n endpoints costs about n² to start: see the README).
        count: u16,
        /// Distinguishes one generated set from another (the second octet).
        seed: u8,
        /// Every n-th address repeats its predecessor (0: none).
        dup_every: u8,
        /// The first port.
        port_base: u16,
        /// TTL in seconds.
        ttl: u8,
    },
}

/// How an address's connections behave, by its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// The connect fails at once.
    Refuse,
    /// The server sends SETTINGS: the connection becomes Ready.
    Serve,
    /// The server never answers: the connect times out.
    Silent,
}

impl Behaviour {
    /// The behaviour of connections to `addr`.
    pub fn of(addr: SocketAddr) -> Self {
        match addr.port() % 4 {
            0 => Behaviour::Refuse,
            3 => Behaviour::Silent,
            _ => Behaviour::Serve,
        }
    }
}

fn read_addr(input: &mut Input<'_>) -> SocketAddr {
    let tag = input.u8();
    let ip = if tag & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(127, input.u8(), input.u8(), input.u8()))
    } else {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    };
    SocketAddr::new(ip, input.u16())
}

fn write_addr(out: &mut Output, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            assert_eq!(a, 127, "only loopback addresses");
            out.u8(0).u8(b).u8(c).u8(d);
        }
        IpAddr::V6(v6) => {
            assert_eq!(v6, Ipv6Addr::LOCALHOST, "only loopback addresses");
            out.u8(1);
        }
    }
    out.u16(addr.port());
}

impl Answer {
    /// Reads one answer.
    pub fn decode(input: &mut Input<'_>) -> Self {
        match input.u8() % 4 {
            0 => {
                let n = usize::from(input.u8() % 32);
                Answer::Error(input.bytes(n))
            }
            1 => {
                let n = input.u8() % 32;
                let addrs = (0..n).map(|_| read_addr(input)).collect();
                Answer::Addresses(addrs, input.u8())
            }
            2 => Answer::Many {
                count: match input.u16() {
                    raw if raw & 0x8000 != 0 => (raw & 0x7fff) % (MAX_BIG_ANSWER + 1),
                    raw => raw % 256,
                },
                seed: input.u8(),
                dup_every: input.u8(),
                port_base: input.u16(),
                ttl: input.u8(),
            },
            _ => Answer::Addresses(Vec::new(), input.u8()),
        }
    }

    /// Writes the answer as [`Answer::decode`] reads it.
    pub fn encode(&self, out: &mut Output) {
        match self {
            Answer::Error(message) => {
                out.u8(0).u8(message.len() as u8).raw(message);
            }
            Answer::Addresses(addrs, ttl) if addrs.is_empty() => {
                out.u8(3).u8(*ttl);
            }
            Answer::Addresses(addrs, ttl) => {
                out.u8(1).u8(addrs.len() as u8);
                addrs.iter().for_each(|a| write_addr(out, *a));
                out.u8(*ttl);
            }
            Answer::Many {
                count,
                seed,
                dup_every,
                port_base,
                ttl,
            } => {
                out.u8(2)
                    .u16(if *count < 256 {
                        *count
                    } else {
                        0x8000 | *count
                    })
                    .u8(*seed)
                    .u8(*dup_every)
                    .u16(*port_base)
                    .u8(*ttl);
            }
        }
    }

    /// What the resolver returns.
    fn resolve(&self) -> Result<Resolution, ResolveError> {
        let (addrs, ttl) = match self {
            Answer::Error(message) => {
                return Err(ResolveError::new(String::from_utf8_lossy(message)));
            }
            Answer::Addresses(addrs, ttl) => (addrs.clone(), *ttl),
            Answer::Many {
                count,
                seed,
                dup_every,
                port_base,
                ttl,
            } => {
                let mut addrs: Vec<SocketAddr> = Vec::with_capacity(usize::from(*count));
                for i in 0..*count {
                    if *dup_every > 0 && i % u16::from(*dup_every) == 0 {
                        if let Some(&last) = addrs.last() {
                            addrs.push(last);
                            continue;
                        }
                    }
                    // Mostly serving ports (a Ready connection costs nothing after
                    // its start); every 16th behaves as `port_base` says.
                    let spaced = port_base.wrapping_add(i.wrapping_mul(4));
                    let port = if i % 16 == 0 {
                        spaced
                    } else {
                        (spaced & !3) | (1 + (i & 1))
                    };
                    let ip = if i % 5 == 4 {
                        IpAddr::V6(Ipv6Addr::LOCALHOST)
                    } else {
                        let [hi, lo] = i.to_be_bytes();
                        IpAddr::V4(Ipv4Addr::new(127, *seed, hi, lo))
                    };
                    addrs.push(SocketAddr::new(ip, port));
                }
                (addrs, *ttl)
            }
        };
        Ok(Resolution::new(
            addrs,
            Some(Duration::from_secs(u64::from(ttl))),
        ))
    }
}

/// A decoded input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Connections per endpoint, 1..=3.
    pub connections_per_endpoint: usize,
    /// The answers, in order.
    pub answers: Vec<Answer>,
}

impl Plan {
    /// Decodes any input into a plan.
    pub fn decode(data: &[u8]) -> Self {
        let mut input = Input::new(data);
        let connections_per_endpoint = 1 + usize::from(input.u8() % 3);
        let mut answers = Vec::new();
        let mut big_seen = false;
        while !input.is_empty() && answers.len() < MAX_STEPS {
            let mut answer = Answer::decode(&mut input);
            // One big answer per input keeps a run near a second at worst.
            if let Answer::Many { count, .. } = &mut answer {
                if *count >= 256 {
                    if big_seen {
                        *count %= 256;
                    }
                    big_seen = true;
                }
            }
            answers.push(answer);
        }
        Self {
            connections_per_endpoint,
            answers,
        }
    }

    /// Encodes the plan as [`Plan::decode`] reads it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Output::default();
        out.u8(self.connections_per_endpoint.saturating_sub(1) as u8);
        self.answers.iter().for_each(|a| a.encode(&mut out));
        out.bytes
    }
}

/// Hands out the scripted answers in order and reports each one as it is delivered.
#[derive(Debug)]
struct ScriptedResolver {
    answers: Mutex<VecDeque<Answer>>,
    delivered: mpsc::UnboundedSender<Result<Resolution, String>>,
}

impl Resolve for ScriptedResolver {
    fn resolve(&self, _target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        let next = self.answers.lock().expect("not poisoned").pop_front();
        let delivered = self.delivered.clone();
        Box::pin(async move {
            let answer = match next {
                Some(answer) => answer.resolve(),
                None => Err(ResolveError::new("script over")),
            };
            // Sent as the answer is handed to the worker, which applies it in this same
            // poll: by the time the harness wakes up, the pool has applied it.
            let _ = delivered.send(match &answer {
                Ok(resolution) => Ok(resolution.clone()),
                Err(e) => Err(e.to_string()),
            });
            answer
        })
    }
}

/// Plays a server that sends its SETTINGS, then reads (and drops) all the client sends.
async fn serve_settings(mut io: DuplexStream) {
    if io.write_all(&wire::settings(&[])).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 4096];
    while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// Plays a server that never answers (and never reads).
async fn serve_nothing(io: DuplexStream) {
    std::future::pending::<()>().await;
    drop(io);
}

/// Runs one input, panicking if an invariant does not hold.
pub fn run(data: &[u8]) {
    run_with(data, Release::AtCloseReturn);
}

/// Runs one input, checking that the closed pool holds no pipe by the time `release` says.
pub fn run_with(data: &[u8], release: Release) {
    let plan = Plan::decode(data);
    crate::paused_runtime().block_on(run_plan(plan, release));
}

async fn run_plan(plan: Plan, release: Release) {
    let steps = plan.answers.len();
    let (delivered_tx, mut delivered) = mpsc::unbounded_channel();
    let resolver = ScriptedResolver {
        answers: Mutex::new(plan.answers.into()),
        delivered: delivered_tx,
    };
    let connector = PipeConnector::new(|dst| match dst.addr.socket_addr().map(Behaviour::of) {
        // The resolver answers socket addresses only.
        None => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        Some(Behaviour::Refuse) => Err(io::Error::from(io::ErrorKind::ConnectionRefused)),
        Some(behaviour) => {
            let (client, server) = tokio::io::duplex(PIPE_CAPACITY);
            if behaviour == Behaviour::Serve {
                tokio::spawn(serve_settings(server));
            } else {
                tokio::spawn(serve_nothing(server));
            }
            Ok(client)
        }
    });
    let per_endpoint = plan.connections_per_endpoint;
    let pool = tonic_pool::Pool::builder("dns:///localhost:50051")
        .resolver(resolver)
        .connector(connector.clone())
        .connections_per_endpoint(per_endpoint)
        .connect_timeout(Duration::from_secs(1))
        .resolve_ttl_bounds(Duration::from_secs(1), Duration::from_secs(4))
        .min_reresolve_interval(Duration::from_secs(1))
        .close_timeout(Duration::from_secs(5))
        .drain_timeout(Duration::from_secs(5))
        .build()
        .expect("a valid configuration");

    let mut last_good: Option<Vec<SocketAddr>> = None;
    // One more than the script: the first "script over" error must keep the last good set.
    for step in 0..=steps {
        let answer = tokio::time::timeout(NEXT_RESOLUTION_WITHIN, delivered.recv())
            .await
            .unwrap_or_else(|_| panic!("step {step}: the resolver was not asked again"))
            .expect("the resolver lives as long as the pool");
        if crate::tracing() {
            let shown = answer.as_ref().map(|r| r.addresses.len());
            eprintln!(
                "step {step} at {:?}: answer {shown:?}",
                tokio::time::Instant::now()
            );
        }
        if let Ok(resolution) = answer {
            if !resolution.addresses.is_empty() {
                last_good = Some(resolution.addresses);
            }
        }
        check_endpoints(&pool, last_good.as_deref(), per_endpoint, step);
    }
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

/// The active endpoints are exactly `expected`, each once and with its connections.
fn check_endpoints(
    pool: &tonic_pool::Pool,
    expected: Option<&[SocketAddr]>,
    per_endpoint: usize,
    step: usize,
) {
    let snapshot = pool.snapshot();
    let mut active: HashMap<SocketAddr, usize> = HashMap::new();
    for endpoint in snapshot.endpoints.iter().filter(|e| !e.draining) {
        let addr = endpoint
            .addr
            .socket_addr()
            .expect("the resolver answers socket addresses only");
        let previous = active.insert(addr, endpoint.connections.len());
        assert!(
            previous.is_none(),
            "step {step}: {} is active twice",
            endpoint.addr
        );
    }
    let expected: HashSet<SocketAddr> = expected.unwrap_or_default().iter().copied().collect();
    for addr in &expected {
        match active.get(addr) {
            None => panic!("step {step}: {addr} of the last good answer has no active endpoint"),
            Some(&n) => assert!(
                n >= per_endpoint,
                "step {step}: {addr} has {n} connections, wants {per_endpoint}"
            ),
        }
    }
    for addr in active.keys() {
        assert!(
            expected.contains(addr),
            "step {step}: {addr} is active but not in the last good answer"
        );
    }
}
