//! [`TestDns`]: an in-process authoritative DNS server for tests, built on hickory-server.
//!
//! It serves one zone, [`ZONE`] (`test.`), over UDP and TCP on the same loopback port. Its
//! records can be changed while it runs ([`TestDns::set_a`], [`TestDns::set_aaaa`],
//! [`TestDns::remove`]), and [`TestDns::set_mode`] makes it misbehave: answer SERVFAIL, answer
//! NOERROR with no records, or never answer at all.
//!
//! Like [`TestServer`](super::TestServer), each server runs on its own OS thread with its own
//! current-thread tokio runtime: [`TestDns::stop`] drops that runtime, closing the sockets at
//! once, and [`TestDns::restart`] serves the same records on the same port again. The query
//! counter survives restarts; waiting on it is event driven ([`tokio::sync::watch`]) and
//! bounded by a timeout.
//!
//! Answers for a name in the zone:
//!
//! | state | answer |
//! |---|---|
//! | records of the asked type | NOERROR, authoritative, the records with their TTL |
//! | the name exists, not with that type | NOERROR, no answer, the zone's SOA (NODATA) |
//! | the name does not exist (never set, or removed) | NXDOMAIN with the zone's SOA |
//! | [`Mode::ServFail`] | SERVFAIL |
//! | [`Mode::Empty`] | NOERROR, no records at all |
//! | [`Mode::Drop`] | nothing (the query is counted, then dropped) |
//! | [`Mode::DropAaaa`] | nothing to AAAA queries, the rest as in [`Mode::Normal`] |
//!
//! Names outside the zone get REFUSED; malformed messages are handled by hickory-server
//! (FORMERR, or dropped when not even the header can be read) and never reach the handler.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, watch};

/// The zone every [`TestDns`] serves.
pub const ZONE: &str = "test.";
/// TTL (and negative-caching TTL) of the zone's SOA record.
const SOA_TTL: u32 = 1;
/// How often [`TestDns::start`] tries to find a port free for both UDP and TCP.
const BIND_TRIES: usize = 20;
/// hickory-server closes a TCP connection idle for this long.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Backlog of the TCP listener.
const TCP_BACKLOG: i32 = 128;
/// Responses buffered per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 16;

/// How the server answers every query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Answer from the records (see the [module docs](self)).
    #[default]
    Normal,
    /// Answer SERVFAIL.
    ServFail,
    /// Answer NOERROR with no records.
    Empty,
    /// Never answer (the client times out).
    Drop,
    /// Answer A queries from the records, never answer AAAA queries.
    DropAaaa,
}

/// The records of one name.
#[derive(Clone, Debug, Default)]
struct Entry {
    a: Vec<Ipv4Addr>,
    a_ttl: u32,
    aaaa: Vec<Ipv6Addr>,
    aaaa_ttl: u32,
}

/// The zone's contents and the server's behaviour.
#[derive(Debug, Default)]
struct Zone {
    names: HashMap<LowerName, Entry>,
    mode: Mode,
}

/// State shared by a [`TestDns`] handle and its server thread.
#[derive(Debug)]
struct Shared {
    zone: Mutex<Zone>,
    /// Queries that reached the handler so far (across restarts).
    queries: watch::Sender<u64>,
}

impl Shared {
    fn zone(&self) -> MutexGuard<'_, Zone> {
        // A panicking test thread must not poison the server's state.
        self.zone.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handles to a running server thread.
#[derive(Debug)]
struct Running {
    /// Send (or drop) to drop the server's runtime.
    kill: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// An authoritative DNS server for the zone `test.`, on its own thread; see the
/// [module docs](self).
#[derive(Debug)]
pub struct TestDns {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Option<Running>,
}

impl TestDns {
    /// Starts a server on `127.0.0.1` (UDP and TCP, same port); panics if it cannot.
    pub fn start() -> TestDns {
        match Self::try_start() {
            Ok(dns) => dns,
            Err(err) => panic!("TestDns: cannot start: {err}"),
        }
    }

    /// Starts a server on `127.0.0.1`, returning the error instead of panicking.
    pub fn try_start() -> io::Result<TestDns> {
        let shared = Arc::new(Shared {
            zone: Mutex::new(Zone::default()),
            queries: watch::Sender::new(0),
        });
        let (running, addr) = spawn_server(None, &shared)?;
        Ok(TestDns {
            addr,
            shared,
            running: Some(running),
        })
    }

    /// The address (UDP and TCP) the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the server is running (not stopped).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Sets the A records of `name` (replacing earlier ones; an empty list keeps the name
    /// with no A records). `name` must be in the zone `test.`; a final dot is optional.
    pub fn set_a(&self, name: &str, addrs: &[Ipv4Addr], ttl_secs: u32) {
        let name = zone_name(name);
        let mut zone = self.shared.zone();
        let entry = zone.names.entry(name).or_default();
        entry.a = addrs.to_vec();
        entry.a_ttl = ttl_secs;
    }

    /// Sets the AAAA records of `name`, like [`TestDns::set_a`].
    pub fn set_aaaa(&self, name: &str, addrs: &[Ipv6Addr], ttl_secs: u32) {
        let name = zone_name(name);
        let mut zone = self.shared.zone();
        let entry = zone.names.entry(name).or_default();
        entry.aaaa = addrs.to_vec();
        entry.aaaa_ttl = ttl_secs;
    }

    /// Removes `name` and all its records: queries for it get NXDOMAIN.
    pub fn remove(&self, name: &str) {
        let name = zone_name(name);
        self.shared.zone().names.remove(&name);
    }

    /// Sets how the server answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.zone().mode = mode;
    }

    /// Queries that reached the server so far (across restarts; dropped ones included).
    pub fn queries(&self) -> u64 {
        *self.shared.queries.borrow()
    }

    /// Waits until at least `n` queries arrived, at most `timeout`; false on timeout.
    pub async fn wait_for_queries(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.queries.subscribe();
        let reached = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|v| *v >= n)).await,
            Ok(Ok(_))
        );
        reached
    }

    /// Stops the server: drops its runtime, closing both sockets. Idempotent.
    pub fn stop(&mut self) {
        if let Some(Running { kill, thread }) = self.running.take() {
            let _ = kill.send(());
            let _ = thread.join();
        }
    }

    /// Stops (if running) and starts again on the same port, with the same records and mode.
    /// Panics if the port cannot be bound again.
    pub fn restart(&mut self) {
        if let Err(err) = self.try_restart() {
            panic!("TestDns: cannot restart on {}: {err}", self.addr);
        }
    }

    /// Like [`TestDns::restart`], returning the bind error instead of panicking.
    pub fn try_restart(&mut self) -> io::Result<()> {
        self.stop();
        let (running, _) = spawn_server(Some(self.addr), &self.shared)?;
        self.running = Some(running);
        Ok(())
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `name` as a fully qualified name in the zone; panics (in the test) if it is not one.
fn zone_name(name: &str) -> LowerName {
    let mut parsed = match Name::from_ascii(name) {
        Ok(parsed) => parsed,
        Err(err) => panic!("TestDns: invalid name {name:?}: {err}"),
    };
    parsed.set_fqdn(true);
    let lower = LowerName::from(parsed);
    assert!(
        zone_origin().zone_of(&lower),
        "TestDns: {name:?} is not in the zone {ZONE}"
    );
    lower
}

fn zone_origin() -> LowerName {
    LowerName::from(Name::from_str(ZONE).expect("valid zone name"))
}

/// The zone's SOA record, sent with negative answers.
fn soa_record() -> Record {
    let origin = Name::from_str(ZONE).expect("valid zone name");
    let mname = Name::from_str("ns.test.").expect("valid name");
    let rname = Name::from_str("hostmaster.test.").expect("valid name");
    let soa = SOA::new(mname, rname, 1, 3600, 600, 86400, SOA_TTL);
    Record::from_rdata(origin, SOA_TTL, RData::SOA(soa))
}

/// Binds UDP and TCP on `addr`'s port, or on a port free for both when `addr` is `None`.
///
/// The TCP listener has `SO_REUSEADDR`, so a restart can bind the port again while old
/// connections linger in TIME_WAIT.
fn bind(addr: Option<SocketAddr>) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let bind_both = |addr: SocketAddr| -> io::Result<_> {
        let udp = std::net::UdpSocket::bind(addr)?;
        let bound = udp.local_addr()?;
        let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        tcp.set_reuse_address(true)?;
        tcp.bind(&bound.into())?;
        tcp.listen(TCP_BACKLOG)?;
        Ok((udp, std::net::TcpListener::from(tcp)))
    };
    match addr {
        Some(addr) => bind_both(addr),
        None => {
            let any_port = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
            let mut last = None;
            for _ in 0..BIND_TRIES {
                match bind_both(any_port) {
                    Ok(sockets) => return Ok(sockets),
                    // The UDP port is taken for TCP: try another one.
                    Err(err) if err.kind() == io::ErrorKind::AddrInUse => last = Some(err),
                    Err(err) => return Err(err),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::other("no port free for UDP and TCP")))
        }
    }
}

/// Starts the server thread and waits until it listens; returns the bound address.
fn spawn_server(
    addr: Option<SocketAddr>,
    shared: &Arc<Shared>,
) -> io::Result<(Running, SocketAddr)> {
    let (udp, tcp) = bind(addr)?;
    let bound = udp.local_addr()?;
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let handler = Handler {
        shared: Arc::clone(shared),
    };
    let (thread, ()) = super::thread::start(
        format!("test-dns-{bound}"),
        move |ready_tx| async move {
            let sockets = UdpSocket::from_std(udp)
                .and_then(|udp| Ok((udp, tokio::net::TcpListener::from_std(tcp)?)));
            let (udp, tcp) = match sockets {
                Ok(sockets) => sockets,
                Err(err) => {
                    let _ = ready_tx.send(Err(err));
                    return;
                }
            };
            let mut server = Server::new(handler);
            server.register_socket(udp);
            server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
            if ready_tx.send(Ok(())).is_err() {
                return; // The starter gave up waiting.
            }
            // Serve until killed (or the handle is gone).
            let _ = kill_rx.await;
            drop(server);
        },
        || {},
    )?;
    Ok((
        Running {
            kill: kill_tx,
            thread,
        },
        bound,
    ))
}

/// The server's request handler: answers from [`Shared`]'s zone.
#[derive(Debug)]
struct Handler {
    shared: Arc<Shared>,
}

/// What to answer one query.
enum Answer {
    /// Send nothing.
    Drop,
    /// Send a response with this code and these records.
    Respond {
        code: ResponseCode,
        answers: Vec<Record>,
        /// Whether to add the zone's SOA (negative answers).
        soa: bool,
    },
}

impl Handler {
    /// Decides the answer to `request` from the current zone and mode.
    fn answer(&self, request: &Request) -> Answer {
        let respond = |code| Answer::Respond {
            code,
            answers: Vec::new(),
            soa: false,
        };
        if request.metadata.op_code != OpCode::Query {
            return respond(ResponseCode::NotImp);
        }
        let [query] = request.queries.queries() else {
            return respond(ResponseCode::FormErr);
        };
        let zone = self.shared.zone();
        match zone.mode {
            Mode::Normal => {}
            Mode::DropAaaa if query.query_type() == RecordType::AAAA => return Answer::Drop,
            Mode::DropAaaa => {}
            Mode::ServFail => return respond(ResponseCode::ServFail),
            Mode::Empty => return respond(ResponseCode::NoError),
            Mode::Drop => return Answer::Drop,
        }
        let name = query.name();
        if query.query_class() != DNSClass::IN || !zone_origin().zone_of(name) {
            return respond(ResponseCode::Refused);
        }
        let Some(entry) = zone.names.get(name) else {
            return Answer::Respond {
                code: ResponseCode::NXDomain,
                answers: Vec::new(),
                soa: true,
            };
        };
        let owner = Name::from(name);
        let answers: Vec<Record> = match query.query_type() {
            RecordType::A => entry
                .a
                .iter()
                .map(|ip| Record::from_rdata(owner.clone(), entry.a_ttl, RData::A(A(*ip))))
                .collect(),
            RecordType::AAAA => entry
                .aaaa
                .iter()
                .map(|ip| Record::from_rdata(owner.clone(), entry.aaaa_ttl, RData::AAAA(AAAA(*ip))))
                .collect(),
            _ => Vec::new(),
        };
        let soa = answers.is_empty();
        Answer::Respond {
            code: ResponseCode::NoError,
            answers,
            soa,
        }
    }

    async fn handle<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let answer = self.answer(request);
        // Counted before answering, so a client that has its answer sees the new count.
        self.shared.queries.send_modify(|n| *n += 1);

        let mut metadata = Metadata::response_from_request(&request.metadata);
        let (code, answers, soa) = match answer {
            Answer::Drop => {
                // Nothing is sent; the returned info only feeds hickory-server's logging.
                metadata.response_code = ResponseCode::ServFail;
                return ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                });
            }
            Answer::Respond { code, answers, soa } => (code, answers, soa),
        };
        metadata.message_type = MessageType::Response;
        metadata.authoritative = code != ResponseCode::Refused;
        metadata.recursion_available = false;
        metadata.response_code = code;

        let mut builder = MessageResponseBuilder::from_message_request(request);
        let edns = request.edns.as_ref().map(|req| {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().max(512));
            edns
        });
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let soa = soa.then(soa_record);
        let response = builder.build(metadata, answers.iter(), [], soa.iter(), []);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => {
                // The client went away; report a failure to hickory-server's logging.
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

// hickory-server declares `RequestHandler` with `#[async_trait]`; this is the signature that
// macro produces, written out so the tests need no extra dependency.
impl RequestHandler for Handler {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: 'async_trait + ResponseHandler,
        T: 'async_trait + Time,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.handle(request, response_handle))
    }
}
