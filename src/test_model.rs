//! A model-based property test of the pool's registry.
//!
//! Generated sequences of events (resolver answers, connection attempts that succeed or fail,
//! GOAWAY, resets, PING timeouts, stream-limit changes, calls starting and ending, draining
//! slots winding down, `close()`) drive the real [`Shared`] registry, while a small model
//! written here from the documented rules follows along. After every call into the registry
//! the two must agree on every connection's state, every endpoint's and the pool's aggregate,
//! the published picker and the calls in flight.
//!
//! What is real and what is played:
//!
//! - The registry, the picker it publishes, the `Connection`s with their in-flight guards and
//!   their drivers are the crate's own. Every `Connection` is a real h2 client connection over
//!   `tokio::io::duplex`, read through the real `FrameWatch`, to a scripted server. The
//!   server writes raw frames rather than being h2's: h2's server sets
//!   `MAX_CONCURRENT_STREAMS` only through its builder, for its first SETTINGS, but a server may change it at any
//!   time (RFC 9113 §6.5), and the picker's "room" follows whatever the last SETTINGS said.
//!   So the stream limit the picker sees is what the server's SETTINGS frames carried, and a
//!   GOAWAY the server writes makes the connection unavailable the moment it is read, before
//!   its slot hears of it — both exactly as in production.
//! - The worker and the slots are played: each event makes the registry calls that the
//!   worker's `run` / `on_resolution` / `apply` / `shutdown` or a slot's `serve` / `finish`
//!   make for it, in the same order and with the same arguments. A slot's reaction to its
//!   worker's Drain or Shutdown is an event of its own ([`Event::Stop`], then
//!   [`Event::Finish`] once its calls are done or cut), and until a slot has reacted it may
//!   still make the transitions it was about to make — the races the real tasks allow. The
//!   model therefore also reaches brief states (Idle between a GOAWAY and the next attempt)
//!   that the real slot leaves at once; the registry must be consistent in those too.
//! - The PING timeout is the driver giving up on the connection: the test cuts it with its
//!   kill switch (keepalive itself is off, so that the paused clock cannot time out every
//!   connection at once; the driver's own tests cover the PING timer).
//!
//! Not modelled: growth beyond the configured connections per endpoint (off by default), the
//! keepalive doubling after `too_many_pings` (keepalive is off), a slot's `connects` counter
//! (the slot's private counter, not the registry's) and the error texts.
//!
//! The pool's state while it has no endpoint follows the worker's docs, not only the state
//! module's "a pool without endpoints is TransientFailure": Idle until asked to connect,
//! Connecting while resolving, TransientFailure only if no good answer ever came.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch};

use crate::balance::Pickable;
use crate::config::Config;
use crate::conn::driver::{DriverHandle, H2Connection};
use crate::conn::frames::{
    FrameSignals, FrameWatch, KillSwitch, Watched, ENHANCE_YOUR_CALM, NO_ERROR,
};
use crate::conn::{ConnStats, Connection, InFlightGuard};
use crate::connector::BoxedIo;
use crate::endpoint::KeepAlive;
use crate::growth::Place;
use crate::registry::Shared;
use crate::state::{wait_until, ConnectivityState as State};
use crate::target::Target;

/// The port of every address; the addresses are 127.0.0.1 to 127.0.0.4.
const PORT: u16 = 50051;
const ADDRESSES: u8 = 4;
/// A bound on every wait for the h2 client to read what the server wrote. The clock is
/// paused, so it only passes when nothing can progress: a stuck test fails, it never hangs.
const WAIT: Duration = Duration::from_secs(60);
/// A bound on the yields spent waiting for a value that no watch announces.
const SETTLE_YIELDS: usize = 1000;

const TYPE_SETTINGS: u8 = 0x4;
const TYPE_GOAWAY: u8 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

fn address(index: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + index % ADDRESSES], PORT))
}

/// One step of a generated history. `u8` selectors choose among the slots (or calls) the
/// event applies to, modulo their number; an event that applies to none does nothing.
#[derive(Clone, Debug)]
enum Event {
    /// The resolver answers these addresses (indices; repeats allowed). An empty answer is
    /// one the worker treats as a failed resolution.
    Resolve(Vec<u8>),
    /// A lazy pool is asked to connect (`Pool::connect`, a first call).
    Connect,
    /// A slot starts an attempt (its first, after a GOAWAY, after its backoff).
    ConnectStart(u8),
    /// The attempt succeeds; the server's first SETTINGS carry this stream limit, if any.
    ConnectOk(u8, Option<u32>),
    /// The attempt fails (refused, timed out): TransientFailure, then backoff.
    ConnectFail(u8),
    /// The server sends GOAWAY(NO_ERROR).
    GoAway(u8),
    /// The server sends GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings").
    TooManyPings(u8),
    /// The server resets the connection (its end of the byte stream goes away).
    Reset(u8),
    /// A keepalive PING goes unanswered: the driver gives up on the connection.
    PingTimeout(u8),
    /// A call finds the connection cannot open streams any more and asks for a new one.
    Replace(u8),
    /// The server sends a new SETTINGS with this `MAX_CONCURRENT_STREAMS`.
    SetLimit(u8, u32),
    /// A call picks a connection the way `Pool::call` does (the selector is the cursor).
    CallStart(u8),
    /// A call in flight ends (its guard is dropped).
    CallEnd(u8),
    /// A slot told to drain or shut down reacts: it takes its connection out of use.
    Stop(u8),
    /// A stopped slot's wind-down ends (calls done or cut): Shutdown, then removed.
    Finish(u8),
    /// `Pool::close()`, then the worker's shutdown.
    Close,
}

fn event() -> impl Strategy<Value = Event> {
    let selector = any::<u8>;
    let limit = || prop_oneof![Just(None), (0u32..=3).prop_map(Some)];
    prop_oneof![
        16 => proptest::collection::vec(0..ADDRESSES, 0..=4).prop_map(Event::Resolve),
        4 => Just(Event::Connect),
        28 => selector().prop_map(Event::ConnectStart),
        28 => (selector(), limit()).prop_map(|(s, l)| Event::ConnectOk(s, l)),
        10 => selector().prop_map(Event::ConnectFail),
        6 => selector().prop_map(Event::GoAway),
        4 => selector().prop_map(Event::TooManyPings),
        6 => selector().prop_map(Event::Reset),
        4 => selector().prop_map(Event::PingTimeout),
        4 => selector().prop_map(Event::Replace),
        12 => (selector(), 0u32..=3).prop_map(|(s, l)| Event::SetLimit(s, l)),
        36 => selector().prop_map(Event::CallStart),
        20 => selector().prop_map(Event::CallEnd),
        10 => selector().prop_map(Event::Stop),
        10 => selector().prop_map(Event::Finish),
        1 => Just(Event::Close),
    ]
}

/// How a case's pool is built.
#[derive(Clone, Copy, Debug)]
struct Setup {
    /// Built with `connect_lazily`: nothing happens until [`Event::Connect`].
    lazy: bool,
    connections_per_endpoint: usize,
    /// Changes of the Ready set that may wait are deferred (as in a pool of thousands of
    /// connections) rather than published at once (as in a small one).
    defer: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        proptest::bool::weighted(0.25),
        1usize..=2,
        proptest::bool::weighted(0.5),
    )
        .prop_map(|(lazy, connections_per_endpoint, defer)| Setup {
            lazy,
            connections_per_endpoint,
            defer,
        })
}

// === the model ===

/// gRPC's aggregation, written again from its definition rather than taken from the crate:
/// members that are Shutdown say nothing about the others (all of them Shutdown: Shutdown);
/// of the rest, any Ready → Ready, else any Connecting → Connecting, else any Idle → Idle,
/// else TransientFailure. An empty set is TransientFailure.
fn grpc_aggregate(states: impl IntoIterator<Item = State>) -> State {
    let states: Vec<State> = states.into_iter().collect();
    if states.is_empty() {
        return State::TransientFailure;
    }
    let live: Vec<State> = states
        .into_iter()
        .filter(|s| *s != State::Shutdown)
        .collect();
    if live.is_empty() {
        return State::Shutdown;
    }
    [State::Ready, State::Connecting, State::Idle]
        .into_iter()
        .find(|s| live.contains(s))
        .unwrap_or(State::TransientFailure)
}

/// Where a slot is in its state machine (`conn::slot::serve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Added by the worker; its task has not started its first attempt.
    Spawned,
    Connecting,
    /// Connected: `current` holds the connection.
    Ready,
    /// After a graceful GOAWAY or a replacement; reconnects at once.
    Idle,
    /// After a failed attempt or a lost connection; reconnects after its backoff.
    Failed,
    /// Its task has ended; removed right after.
    Shutdown,
}

impl Phase {
    /// The state the registry must show for a slot in this phase.
    fn state(self) -> State {
        match self {
            Phase::Spawned | Phase::Connecting => State::Connecting,
            Phase::Ready => State::Ready,
            Phase::Idle => State::Idle,
            Phase::Failed => State::TransientFailure,
            Phase::Shutdown => State::Shutdown,
        }
    }
}

/// What the worker last told a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Run,
    Drain,
    Shutdown,
}

#[derive(Debug)]
struct SlotModel {
    id: u64,
    addr: SocketAddr,
    /// Index in [`Model::endpoints`].
    endpoint: usize,
    stats: Arc<ConnStats>,
    phase: Phase,
    /// Failed since it was last Ready.
    failed: bool,
    control: Control,
    /// Has reacted to a Drain or Shutdown: makes no transition but its last.
    stopped: bool,
    removed: bool,
    /// Index in [`Model::conns`] of its connection, while Ready.
    current: Option<usize>,
    /// Calls started on it, over all its connections.
    calls: u64,
}

impl SlotModel {
    /// The state it counts as in its endpoint's aggregate (state.rs: a connection that failed
    /// counts as TransientFailure until it is Ready again).
    fn counted(&self) -> State {
        match self.phase {
            Phase::Ready | Phase::Shutdown => self.phase.state(),
            _ if self.failed => State::TransientFailure,
            phase => phase.state(),
        }
    }
}

/// One h2 connection a slot opened, current or retired.
#[derive(Debug)]
struct ConnModel {
    ready: Arc<Connection>,
    /// The server's `MAX_CONCURRENT_STREAMS` (`u32::MAX`: none).
    limit: u32,
    /// The server's GOAWAY has been read.
    goaway: bool,
    /// Taken out of use (retired, lost, replaced, stopped).
    closing: bool,
    in_flight: usize,
    /// The scripted server's input; dropping it hangs the server up.
    server: Option<mpsc::UnboundedSender<Vec<u8>>>,
    driver: DriverHandle,
    signals: watch::Receiver<FrameSignals>,
    kill: Arc<KillSwitch>,
}

impl ConnModel {
    fn available(&self) -> bool {
        !self.closing && !self.goaway
    }

    fn has_room(&self) -> bool {
        (self.in_flight as u64) < u64::from(self.limit)
    }
}

#[derive(Debug)]
struct EndpointModel {
    addr: SocketAddr,
    draining: bool,
    /// Its slots not yet removed; the registry forgets an endpoint once this is empty.
    slots: Vec<usize>,
}

#[derive(Debug)]
struct Model {
    connect_requested: bool,
    shut_down: bool,
    ever_resolved: bool,
    /// The pool's state while it has no active endpoint.
    no_endpoints: State,
    /// The worker's map of active addresses to their slots.
    active: BTreeMap<SocketAddr, Vec<usize>>,
    endpoints: Vec<EndpointModel>,
    slots: Vec<SlotModel>,
    conns: Vec<ConnModel>,
    /// Calls in flight: the connection (index in `conns`) and the real guard.
    calls: Vec<(usize, InFlightGuard)>,
}

impl Model {
    fn new() -> Self {
        Self {
            connect_requested: false,
            shut_down: false,
            ever_resolved: false,
            no_endpoints: State::Idle,
            active: BTreeMap::new(),
            endpoints: Vec::new(),
            slots: Vec::new(),
            conns: Vec::new(),
            calls: Vec::new(),
        }
    }

    fn live_endpoints(&self) -> impl Iterator<Item = &EndpointModel> {
        self.endpoints.iter().filter(|e| !e.slots.is_empty())
    }

    fn endpoint_state(&self, endpoint: &EndpointModel) -> State {
        grpc_aggregate(endpoint.slots.iter().map(|&s| self.slots[s].counted()))
    }

    fn pool_state(&self) -> State {
        if self.shut_down {
            return State::Shutdown;
        }
        let active: Vec<State> = self
            .live_endpoints()
            .filter(|e| !e.draining)
            .map(|e| self.endpoint_state(e))
            .collect();
        if active.is_empty() {
            self.no_endpoints
        } else {
            grpc_aggregate(active)
        }
    }

    /// The connections the picker must hold: those of Ready slots of active endpoints, none
    /// once the pool is shut down (calls are refused).
    fn pickable(&self) -> Vec<usize> {
        if self.shut_down {
            return Vec::new();
        }
        self.slots
            .iter()
            .filter(|s| !s.removed && !self.endpoints[s.endpoint].draining)
            .filter_map(|s| s.current)
            .collect()
    }

    fn add_slot(&mut self, id: u64, addr: SocketAddr, stats: Arc<ConnStats>) -> usize {
        let index = self.slots.len();
        let endpoint = match self
            .endpoints
            .iter()
            .position(|e| e.addr == addr && !e.draining && !e.slots.is_empty())
        {
            Some(e) => e,
            None => {
                self.endpoints.push(EndpointModel {
                    addr,
                    draining: false,
                    slots: Vec::new(),
                });
                self.endpoints.len() - 1
            }
        };
        self.endpoints[endpoint].slots.push(index);
        self.slots.push(SlotModel {
            id,
            addr,
            endpoint,
            stats,
            // Slots are only added once the pool was asked to connect.
            phase: Phase::Spawned,
            failed: false,
            control: Control::Run,
            stopped: false,
            removed: false,
            current: None,
            calls: 0,
        });
        index
    }

    /// The slot chosen by `selector` among those `eligible`.
    fn slot_where(&self, selector: u8, eligible: impl Fn(&SlotModel) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.slots.len())
            .filter(|&s| !self.slots[s].removed && eligible(&self.slots[s]))
            .collect();
        (!candidates.is_empty()).then(|| candidates[usize::from(selector) % candidates.len()])
    }

    fn conn_of(&self, ready: &Arc<Connection>) -> Option<usize> {
        self.conns.iter().position(|c| Arc::ptr_eq(&c.ready, ready))
    }
}

/// One connection as the snapshot shows it, or as the model expects it.
#[derive(Debug, PartialEq, Eq)]
struct ConnView {
    id: u64,
    state: State,
    in_flight: usize,
    calls: u64,
    max_concurrent_streams: Option<u32>,
}

/// One endpoint as the snapshot shows it, or as the model expects it.
#[derive(Debug, PartialEq, Eq)]
struct EndpointView {
    addr: SocketAddr,
    draining: bool,
    state: State,
    connections: Vec<ConnView>,
}

// === the scripted server ===

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
    bytes.extend_from_slice(&0u32.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn settings(max_concurrent_streams: Option<u32>) -> Vec<u8> {
    let mut payload = Vec::new();
    if let Some(limit) = max_concurrent_streams {
        payload.extend_from_slice(&SETTINGS_MAX_CONCURRENT_STREAMS.to_be_bytes());
        payload.extend_from_slice(&limit.to_be_bytes());
    }
    frame(TYPE_SETTINGS, &payload)
}

fn goaway(error_code: u32, debug: &[u8]) -> Vec<u8> {
    let mut payload = 0u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&error_code.to_be_bytes());
    payload.extend_from_slice(debug);
    frame(TYPE_GOAWAY, &payload)
}

/// The server end of one connection: writes the frames it is sent, reads and drops what the
/// client writes, and hangs up (its end of the pipe goes away) once its sender is dropped.
fn scripted_server(mut io: DuplexStream) -> mpsc::UnboundedSender<Vec<u8>> {
    let (frames, mut script) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let mut reading = true;
        loop {
            tokio::select! {
                next = script.recv() => match next {
                    Some(bytes) => {
                        if io.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                read = io.read(&mut buf), if reading => {
                    reading = matches!(read, Ok(n) if n > 0);
                }
            }
        }
    });
    frames
}

/// What [`open`] hands over, as the slot's `connect` does.
struct Opened {
    send: h2::client::SendRequest<Bytes>,
    connection: H2Connection,
    watched: Watched,
    server: mpsc::UnboundedSender<Vec<u8>>,
}

/// Opens a connection the way the slot's `connect` does: HTTP/2 handshake over the watched
/// stream, then drive it until the server's SETTINGS arrived.
async fn open(limit: Option<u32>) -> Result<Opened, TestCaseError> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = scripted_server(server_io);
    server
        .send(settings(limit))
        .map_err(|_| TestCaseError::fail("scripted server gone"))?;
    let (io, watched) = FrameWatch::new(Box::new(client_io) as BoxedIo, None);
    let (send, mut connection) = h2::client::Builder::new()
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| TestCaseError::fail(format!("handshake: {e}")))?;
    let mut settings_rx = watched.signals.clone();
    let seen = tokio::time::timeout(WAIT, async {
        tokio::select! {
            _ = &mut connection => None,
            seen = wait_until(&mut settings_rx, |s| s.settings) => seen,
        }
    })
    .await;
    prop_assert!(
        matches!(seen, Ok(Some(_))),
        "the server's SETTINGS never arrived"
    );
    Ok(Opened {
        send,
        connection,
        watched,
        server,
    })
}

/// Yields until `done` holds, a bounded number of times; returns whether it held.
async fn settle(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..SETTLE_YIELDS {
        if done() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    done()
}

// === the harness: one case ===

struct Case {
    shared: Arc<Shared>,
    model: Model,
    defer: bool,
    /// Checks so far: with `defer`, every other one looks at the registry without making the
    /// pending publication, so that deferred changes pile up across steps.
    checks: std::cell::Cell<usize>,
    /// The event being applied, for messages.
    step: String,
}

impl Case {
    fn new(setup: Setup) -> Self {
        let config = Config {
            connections_per_endpoint: setup.connections_per_endpoint,
            connect_lazily: setup.lazy,
            ..Config::default()
        };
        let target = Target::parse("dns:///localhost:50051").expect("target");
        // The worker is played by the test: nothing reads its mailbox, so requests to it
        // (re-resolution, growth) go nowhere.
        let (mailbox, _) = crate::mailbox::mailbox();
        let shared = Shared::new(
            config,
            target,
            tokio::runtime::Handle::current(),
            crate::mailbox::WeakMailbox::new(&mailbox),
        );
        if setup.defer {
            shared.defer_publications();
        }
        Self {
            shared,
            model: Model::new(),
            defer: setup.defer,
            checks: std::cell::Cell::new(0),
            step: "build".to_owned(),
        }
    }

    /// The worker's start: an eager pool asks to connect at once.
    fn start(&mut self, lazy: bool) -> Result<(), TestCaseError> {
        self.check("built")?;
        if !lazy {
            self.connect()?;
        }
        Ok(())
    }

    async fn apply(&mut self, index: usize, event: &Event) -> Result<(), TestCaseError> {
        self.step = format!("event {index} {event:?}");
        match *event {
            Event::Resolve(ref answer) => self.resolve(answer),
            Event::Connect => self.connect(),
            Event::ConnectStart(s) => self.connect_start(s),
            Event::ConnectOk(s, limit) => self.connect_ok(s, limit).await,
            Event::ConnectFail(s) => self.connect_fail(s),
            Event::GoAway(s) => self.goaway(s, NO_ERROR, b"").await,
            Event::TooManyPings(s) => self.goaway(s, ENHANCE_YOUR_CALM, b"too_many_pings").await,
            Event::Reset(s) => self.lose(s, false).await,
            Event::PingTimeout(s) => self.lose(s, true).await,
            Event::Replace(s) => self.replace(s),
            Event::SetLimit(s, limit) => self.set_limit(s, limit).await,
            Event::CallStart(cursor) => self.call_start(cursor),
            Event::CallEnd(s) => self.call_end(s),
            Event::Stop(s) => self.stop(s),
            Event::Finish(s) => self.finish(s),
            Event::Close => self.close(),
        }
    }

    /// `Pool::connect` (or a lazy pool's first call), then the worker leaving its idle wait.
    fn connect(&mut self) -> Result<(), TestCaseError> {
        self.shared.request_connect();
        if self.model.connect_requested || self.model.shut_down {
            // Already resolving, or the worker is gone.
            return self.check("connect requested again");
        }
        self.model.connect_requested = true;
        self.shared
            .set_no_endpoints_state(State::Connecting, "resolving");
        self.model.no_endpoints = State::Connecting;
        self.check("worker resolving")
    }

    /// The worker's `on_resolution` and `apply`.
    fn resolve(&mut self, answer: &[u8]) -> Result<(), TestCaseError> {
        if !self.model.connect_requested || self.model.shut_down {
            // The worker resolves only once asked to connect, and not after it stopped.
            return Ok(());
        }
        if answer.is_empty() {
            let reason = format!(
                "resolution of {} failed: resolver returned no addresses",
                self.shared.target
            );
            self.shared.record_resolve_error(&reason);
            self.check("empty answer recorded")?;
            if !self.model.ever_resolved {
                self.shared
                    .set_no_endpoints_state(State::TransientFailure, &reason);
                self.model.no_endpoints = State::TransientFailure;
                self.check("empty answer and no good one before")?;
            }
            return Ok(());
        }
        let addresses: Vec<SocketAddr> = answer.iter().map(|&i| address(i)).collect();
        self.model.ever_resolved = true;
        self.shared
            .set_no_endpoints_state(State::Connecting, "resolved");
        self.model.no_endpoints = State::Connecting;
        self.check("resolved")?;
        for &addr in &addresses {
            if self.model.active.contains_key(&addr) {
                continue;
            }
            let keepalive = Arc::new(KeepAlive::new(self.shared.config.keep_alive_interval));
            let mut slots = Vec::new();
            for _ in 0..self.shared.config.connections_for(&addr.into()) {
                // The slot is played by the test: its control handle goes nowhere.
                let (control, _) = tokio::sync::watch::channel(crate::conn::Control::Run);
                let (id, stats) = self.shared.add_connection(addr.into(), &keepalive, control);
                slots.push(self.model.add_slot(id, addr, stats));
                self.check("connection added")?;
            }
            self.model.active.insert(addr, slots);
        }
        let removed: Vec<SocketAddr> = self
            .model
            .active
            .keys()
            .filter(|a| !addresses.contains(a))
            .copied()
            .collect();
        for addr in removed {
            self.shared.set_draining(&addr.into());
            let slots = self.model.active.remove(&addr).unwrap_or_default();
            if let Some(&first) = slots.first() {
                let endpoint = self.model.slots[first].endpoint;
                self.model.endpoints[endpoint].draining = true;
            }
            for s in slots {
                self.model.slots[s].control = Control::Drain;
            }
            self.check("address removed")?;
        }
        Ok(())
    }

    fn connect_start(&mut self, selector: u8) -> Result<(), TestCaseError> {
        let Some(s) = self.model.slot_where(selector, |s| {
            !s.stopped && matches!(s.phase, Phase::Spawned | Phase::Idle | Phase::Failed)
        }) else {
            return Ok(());
        };
        self.shared.transition(
            self.model.slots[s].id,
            State::Connecting,
            "connecting",
            None,
        );
        self.model.slots[s].phase = Phase::Connecting;
        self.check("attempt started")
    }

    async fn connect_ok(&mut self, selector: u8, limit: Option<u32>) -> Result<(), TestCaseError> {
        let Some(s) = self
            .model
            .slot_where(selector, |s| !s.stopped && s.phase == Phase::Connecting)
        else {
            return Ok(());
        };
        let Opened {
            send,
            connection,
            watched,
            server,
        } = open(limit).await?;
        let slot = &self.model.slots[s];
        let ready = Arc::new(Connection::new(
            slot.id,
            slot.addr.into(),
            send,
            slot.stats.clone(),
            watched.fate,
            watched.limits,
        ));
        let driver = crate::conn::driver::spawn(connection, ready.clone(), Default::default());
        self.shared.transition(
            slot.id,
            State::Ready,
            "server settings received",
            Some(ready.clone()),
        );
        self.model.conns.push(ConnModel {
            ready,
            limit: limit.unwrap_or(u32::MAX),
            goaway: false,
            closing: false,
            in_flight: 0,
            server: Some(server),
            driver,
            signals: watched.signals,
            kill: watched.kill,
        });
        let slot = &mut self.model.slots[s];
        slot.current = Some(self.model.conns.len() - 1);
        slot.phase = Phase::Ready;
        slot.failed = false;
        self.check("connected")
    }

    fn connect_fail(&mut self, selector: u8) -> Result<(), TestCaseError> {
        let Some(s) = self
            .model
            .slot_where(selector, |s| !s.stopped && s.phase == Phase::Connecting)
        else {
            return Ok(());
        };
        self.shared.transition(
            self.model.slots[s].id,
            State::TransientFailure,
            "connect error: connection refused",
            None,
        );
        self.shared.request_reresolve();
        let slot = &mut self.model.slots[s];
        slot.phase = Phase::Failed;
        slot.failed = true;
        self.check("attempt failed")
    }

    /// A Ready slot that is still serving, and its connection.
    fn serving(&self, selector: u8) -> Option<(usize, usize)> {
        let s = self
            .model
            .slot_where(selector, |s| !s.stopped && s.phase == Phase::Ready)?;
        Some((
            s,
            self.model.slots[s].current.expect("Ready has a connection"),
        ))
    }

    /// The server sends a GOAWAY; the slot sees it and retires the connection.
    async fn goaway(&mut self, selector: u8, code: u32, debug: &[u8]) -> Result<(), TestCaseError> {
        let Some((s, c)) = self.serving(selector) else {
            return Ok(());
        };
        let conn = &mut self.model.conns[c];
        let sent = conn
            .server
            .as_ref()
            .is_some_and(|server| server.send(goaway(code, debug)).is_ok());
        prop_assert!(
            sent,
            "{}: the server of a serving connection is gone",
            self.step
        );
        let read =
            tokio::time::timeout(WAIT, wait_until(&mut conn.signals, |s| s.goaway.is_some())).await;
        prop_assert!(
            matches!(read, Ok(Some(_))),
            "{}: GOAWAY never read",
            self.step
        );
        conn.goaway = true;
        self.check("GOAWAY read, before its slot reacts")?;
        if code == NO_ERROR {
            self.retire(s, State::Idle, "GOAWAY from server", true)
        } else {
            self.retire(
                s,
                State::TransientFailure,
                "GOAWAY ENHANCE_YOUR_CALM too_many_pings",
                true,
            )
        }
    }

    /// The connection is lost: the server hangs up, or (`ping_timeout`) the driver gives up
    /// on a peer that stopped answering and cuts it. Either way the driver ends first.
    async fn lose(&mut self, selector: u8, ping_timeout: bool) -> Result<(), TestCaseError> {
        let Some((s, c)) = self.serving(selector) else {
            return Ok(());
        };
        let conn = &mut self.model.conns[c];
        if ping_timeout {
            conn.kill.kill();
        } else {
            conn.server = None;
        }
        let ended = tokio::time::timeout(WAIT, conn.driver.ended()).await;
        prop_assert!(ended.is_ok(), "{}: the driver did not end", self.step);
        // The driver's last act.
        conn.closing = true;
        self.check("driver ended, before its slot reacts")?;
        let reason = if ping_timeout {
            "connection lost: keepalive PING not acknowledged within 20s"
        } else {
            "connection lost: connection reset"
        };
        self.retire(s, State::TransientFailure, reason, true)
    }

    /// A call asks for the connection to be replaced; the slot does so.
    fn replace(&mut self, selector: u8) -> Result<(), TestCaseError> {
        let Some((s, c)) = self.serving(selector) else {
            return Ok(());
        };
        let reason = "stream ids exhausted";
        self.model.conns[c].ready.request_replacement(reason);
        self.model.conns[c].closing = true;
        self.check("replacement requested, before its slot reacts")?;
        self.retire(s, State::Idle, reason, false)
    }

    /// The slot's end of serving a connection: out of use, retired, then the transition.
    fn retire(
        &mut self,
        s: usize,
        to: State,
        reason: &str,
        reresolve: bool,
    ) -> Result<(), TestCaseError> {
        let slot = &mut self.model.slots[s];
        let c = slot.current.take().expect("retiring a Ready slot");
        let conn = &mut self.model.conns[c];
        conn.ready.mark_closing();
        conn.driver.retire();
        conn.closing = true;
        self.shared.transition(slot.id, to, reason, None);
        if to == State::Idle {
            slot.phase = Phase::Idle;
        } else {
            slot.phase = Phase::Failed;
            slot.failed = true;
        }
        if reresolve {
            self.shared.request_reresolve();
        }
        self.check("connection retired")
    }

    /// The server changes its stream limit on a serving connection.
    async fn set_limit(&mut self, selector: u8, limit: u32) -> Result<(), TestCaseError> {
        let Some((_, c)) = self.serving(selector) else {
            return Ok(());
        };
        let conn = &mut self.model.conns[c];
        let sent = conn
            .server
            .as_ref()
            .is_some_and(|server| server.send(settings(Some(limit))).is_ok());
        prop_assert!(
            sent,
            "{}: the server of a serving connection is gone",
            self.step
        );
        let ready = conn.ready.clone();
        let read = settle(|| ready.limits.max_concurrent_streams() == limit).await;
        prop_assert!(read, "{}: the new SETTINGS never read", self.step);
        conn.limit = limit;
        self.check("stream limit changed")
    }

    /// `Pool::call` then `Pool::pick`: refused once shut down, else a pick and its guard.
    fn call_start(&mut self, cursor: u8) -> Result<(), TestCaseError> {
        if self.shared.is_shut_down() {
            prop_assert!(self.model.shut_down, "{}: shut down early", self.step);
            return Ok(());
        }
        let (_, picker) = self.shared.load_picker();
        let cursor = AtomicUsize::new(usize::from(cursor));
        let Some((ready, all_full)) = picker.pick_reporting(&cursor) else {
            // The call would wait for a connection; the picks are checked in `check`.
            return Ok(());
        };
        if all_full {
            self.shared.request_growth(&ready.addr);
        }
        let c = self.model.conn_of(ready);
        prop_assert!(c.is_some(), "{}: picked an unknown connection", self.step);
        let c = c.expect("checked");
        let guard = ready.start_call();
        let conn = &mut self.model.conns[c];
        conn.in_flight += 1;
        // The call is beyond the limit when the limit was already taken before it.
        prop_assert_eq!(
            guard.is_beyond_stream_limit(),
            conn.in_flight as u64 > u64::from(conn.limit),
            "{}: place of the call against the stream limit",
            &self.step
        );
        let slot = self
            .model
            .slots
            .iter_mut()
            .find(|s| s.current == Some(c))
            .expect("a picked connection is its slot's current one");
        slot.calls += 1;
        self.model.calls.push((c, guard));
        self.check("call started")
    }

    fn call_end(&mut self, selector: u8) -> Result<(), TestCaseError> {
        if self.model.calls.is_empty() {
            return Ok(());
        }
        let (c, guard) = self
            .model
            .calls
            .remove(usize::from(selector) % self.model.calls.len());
        drop(guard);
        self.model.conns[c].in_flight -= 1;
        self.check("call ended")
    }

    /// A slot told to drain or shut down reacts (`serve` returns): a Ready one takes its
    /// connection out of use and retires it; its registry entry stays until `finish`.
    fn stop(&mut self, selector: u8) -> Result<(), TestCaseError> {
        let Some(s) = self
            .model
            .slot_where(selector, |s| !s.stopped && s.control != Control::Run)
        else {
            return Ok(());
        };
        let slot = &mut self.model.slots[s];
        slot.stopped = true;
        if let Some(c) = slot.current {
            let conn = &mut self.model.conns[c];
            conn.ready.mark_closing();
            conn.driver.retire();
            conn.closing = true;
        }
        self.check("slot stopped")
    }

    /// A stopped slot's wind-down ends: the end of `conn::slot::run`.
    fn finish(&mut self, selector: u8) -> Result<(), TestCaseError> {
        let Some(s) = self.model.slot_where(selector, |s| s.stopped) else {
            return Ok(());
        };
        let slot = &mut self.model.slots[s];
        let reason = match slot.control {
            Control::Drain => "drained",
            _ => "pool closed",
        };
        self.shared
            .transition(slot.id, State::Shutdown, reason, None);
        slot.phase = Phase::Shutdown;
        slot.current = None;
        self.check("slot shut down")?;
        let slot = &mut self.model.slots[s];
        self.shared.remove_connection(slot.id);
        slot.removed = true;
        self.model.endpoints[slot.endpoint]
            .slots
            .retain(|&x| x != s);
        self.check("slot removed")
    }

    /// `Pool::close()`, then the worker's `shutdown`.
    fn close(&mut self) -> Result<(), TestCaseError> {
        self.shared.shut_down("close() called");
        if self.model.shut_down {
            // A second close finds the worker gone.
            return self.check("closed again");
        }
        self.model.shut_down = true;
        self.check("close() called")?;
        self.shared.shut_down("pool closed");
        for slot in self.model.slots.iter_mut().filter(|s| !s.removed) {
            slot.control = Control::Shutdown;
        }
        self.check("worker shut down")
    }

    /// After close: every slot stops and finishes, every call ends.
    fn wind_down(&mut self) -> Result<(), TestCaseError> {
        self.step = "wind-down".to_owned();
        self.close()?;
        while self.model.slots.iter().any(|s| !s.removed) {
            self.stop(0)?;
            self.finish(0)?;
        }
        while !self.model.calls.is_empty() {
            self.call_end(0)?;
        }
        Ok(())
    }

    /// Everything the registry shows agrees with the model.
    fn check(&self, after: &str) -> Result<(), TestCaseError> {
        let step = format!("{} — after {after}", self.step);
        let model = &self.model;
        let pickable = model.pickable();

        // The published picker, deferred changes pending or not: a call can pick from it
        // only connections it may take (an entry that is not one is no longer available: a
        // pick steps over it), and it holds one whenever there is one, so that calls never
        // wait while a connection is Ready.
        let (_, published) = self.shared.load_picker();
        for entry in published.entries() {
            let c = model.conn_of(entry);
            prop_assert!(
                !entry.is_available() || c.is_some_and(|c| pickable.contains(&c)),
                "{}: the published picker offers #{:?}, not one of {:?}",
                &step,
                c,
                pickable
            );
        }
        if !pickable.is_empty() {
            prop_assert!(
                published
                    .entries()
                    .iter()
                    .any(|e| model.conn_of(e).is_some_and(|c| pickable.contains(&c))),
                "{}: Ready connections {:?} but none in the published picker",
                &step,
                pickable
            );
        }
        let checks = self.checks.get();
        self.checks.set(checks + 1);
        let as_is = self.defer && checks % 2 == 1;
        let snapshot = if as_is {
            self.shared.snapshot_as_is()
        } else {
            // Makes a deferred publication first, if one is pending.
            self.shared.snapshot()
        };

        // The pool's aggregate, in the snapshot and in the watch.
        let pool = model.pool_state();
        prop_assert_eq!(snapshot.state, pool, "{}: pool state (snapshot)", &step);
        prop_assert_eq!(self.shared.state(), pool, "{}: pool state (watch)", &step);
        prop_assert_eq!(self.shared.is_shut_down(), model.shut_down, "{}", &step);

        // Every endpoint and connection: state, aggregate, calls in flight, stream limit.
        let by_first_id = |e: &EndpointView| e.connections.first().map(|c| c.id);
        let mut seen: Vec<EndpointView> = snapshot
            .endpoints
            .iter()
            .map(|e| EndpointView {
                addr: e.addr.socket_addr().expect("the model's addresses are TCP"),
                draining: e.draining,
                state: e.state,
                connections: e
                    .connections
                    .iter()
                    .map(|c| ConnView {
                        id: c.id,
                        state: c.state,
                        in_flight: c.in_flight,
                        calls: c.calls,
                        max_concurrent_streams: c.max_concurrent_streams,
                    })
                    .collect(),
            })
            .collect();
        let mut expected: Vec<EndpointView> = model
            .live_endpoints()
            .map(|e| EndpointView {
                addr: e.addr,
                draining: e.draining,
                state: model.endpoint_state(e),
                connections: e
                    .slots
                    .iter()
                    .map(|&s| {
                        let slot = &model.slots[s];
                        let current = slot.current.map(|c| &model.conns[c]);
                        ConnView {
                            id: slot.id,
                            state: slot.phase.state(),
                            in_flight: current.map_or(0, |c| c.in_flight),
                            calls: slot.calls,
                            max_concurrent_streams: current
                                .map(|c| c.limit)
                                .filter(|l| *l != u32::MAX),
                        }
                    })
                    .collect(),
            })
            .collect();
        for view in seen.iter_mut().chain(expected.iter_mut()) {
            view.connections.sort_by_key(|c| c.id);
        }
        seen.sort_by_key(by_first_id);
        expected.sort_by_key(by_first_id);
        prop_assert_eq!(seen, expected, "{}: endpoints", &step);

        // Calls in flight: the pool's count and each connection's, retired ones included.
        prop_assert_eq!(
            self.shared.in_flight.get(),
            model.calls.len(),
            "{}: pool in flight",
            &step
        );
        for (c, conn) in model.conns.iter().enumerate() {
            prop_assert_eq!(
                conn.ready.in_flight(),
                conn.in_flight,
                "{}: in flight on connection #{}",
                &step,
                c
            );
        }

        // The summary: the counts the registry keeps agree with the snapshot.
        let summary = self.shared.summary();
        prop_assert_eq!(summary.state, snapshot.state, "{}: summary state", &step);
        let mut connections = crate::state::StateCounts::default();
        let mut endpoints = crate::state::StateCounts::default();
        let (mut draining_endpoints, mut draining_connections) = (0, 0);
        let mut ejected_endpoints = 0;
        for endpoint in &snapshot.endpoints {
            if endpoint.draining {
                draining_endpoints += 1;
                draining_connections += endpoint.connections.len();
            } else {
                ejected_endpoints += usize::from(endpoint.ejected);
                endpoints.add(endpoint.state);
                for conn in &endpoint.connections {
                    connections.add(conn.state);
                }
            }
        }
        prop_assert_eq!(
            summary.connections,
            connections,
            "{}: summary connections",
            &step
        );
        prop_assert_eq!(summary.endpoints, endpoints, "{}: summary endpoints", &step);
        prop_assert_eq!(
            (summary.draining_endpoints, summary.draining_connections),
            (draining_endpoints, draining_connections),
            "{}: summary draining",
            &step
        );
        prop_assert_eq!(
            summary.ejected_endpoints,
            ejected_endpoints,
            "{}: summary ejected",
            &step
        );
        prop_assert_eq!(
            summary.in_flight,
            model.calls.len(),
            "{}: summary in flight",
            &step
        );
        if as_is {
            // The picker's exact content is checked once the publication is made.
            return Ok(());
        }

        // The picker: exactly the Ready connections of active endpoints. Only the entries it
        // hands out can be told apart through its API, so: as many entries, and starting
        // from every position, a pick is an available one, one with room whenever there is
        // one, `all_full` exactly when none has room — and together the picks cover every
        // available connection with room (or, all being full, every available one).
        let (_, picker) = self.shared.load_picker();
        prop_assert_eq!(picker.len(), pickable.len(), "{}: picker size", &step);
        if !model.shut_down {
            prop_assert_eq!(
                snapshot.ready_connections(),
                pickable.len(),
                "{}: ready connections",
                &step
            );
        }
        let available: BTreeSet<usize> = pickable
            .iter()
            .copied()
            .filter(|&c| model.conns[c].available())
            .collect();
        let with_room: BTreeSet<usize> = available
            .iter()
            .copied()
            .filter(|&c| model.conns[c].has_room())
            .collect();
        let mut handed_out = BTreeSet::new();
        for start in 0..picker.round_robin_cycle() {
            let cursor = AtomicUsize::new(start);
            match picker.pick_reporting(&cursor) {
                None => prop_assert!(
                    available.is_empty(),
                    "{}: nothing picked from {:?} available",
                    &step,
                    available
                ),
                Some((ready, all_full)) => {
                    let c = model.conn_of(ready);
                    prop_assert!(
                        c.is_some_and(|c| available.contains(&c)),
                        "{}: picked #{:?}, not one of the available {:?}",
                        &step,
                        c,
                        available
                    );
                    prop_assert_eq!(all_full, with_room.is_empty(), "{}: all_full", &step);
                    handed_out.extend(c);
                }
            }
        }
        let expected_picks = if with_room.is_empty() {
            available
        } else {
            with_room
        };
        prop_assert_eq!(handed_out, expected_picks, "{}: connections picked", &step);
        Ok(())
    }
}

/// A case's runtime: one thread, paused clock (no real socket is involved).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// Runs one generated history on its own paused current-thread runtime; with `wind_down`,
/// closes the pool at the end and lets every slot finish.
fn run_case(setup: Setup, events: &[Event], wind_down: bool) -> Result<(), TestCaseError> {
    runtime().block_on(async {
        let mut case = Case::new(setup);
        case.start(setup.lazy)?;
        for (index, event) in events.iter().enumerate() {
            case.apply(index, event).await?;
        }
        if wind_down {
            case.wind_down()?;
            let snapshot = case.shared.snapshot();
            prop_assert!(snapshot.endpoints.is_empty(), "left: {:?}", snapshot);
            prop_assert_eq!(snapshot.state, State::Shutdown);
            prop_assert!(case.shared.load_picker().1.is_empty());
            prop_assert_eq!(case.shared.in_flight.get(), 0);
        }
        Ok(())
    })
}

/// The model's own aggregation gives gRPC's answers on hand-picked sets, Shutdown members
/// included, so that the properties below measure the registry against the right rule.
#[test]
fn the_models_rule_is_grpcs() {
    use State::*;
    assert_eq!(grpc_aggregate([]), TransientFailure);
    assert_eq!(grpc_aggregate([TransientFailure, Idle, Ready]), Ready);
    assert_eq!(
        grpc_aggregate([Idle, TransientFailure, Connecting]),
        Connecting
    );
    assert_eq!(grpc_aggregate([TransientFailure, Idle]), Idle);
    assert_eq!(grpc_aggregate([TransientFailure]), TransientFailure);
    assert_eq!(grpc_aggregate([Shutdown, Idle]), Idle);
    assert_eq!(grpc_aggregate([Shutdown, Shutdown]), Shutdown);
}

/// While an address that was removed and listed again still drains its old connections,
/// `PoolSnapshot::endpoint(addr)` answers with the address's active endpoint, the one new
/// calls go to — not with the draining one.
#[test]
fn endpoint_lookup_finds_the_active_endpoint_of_a_relisted_address() {
    let events = [
        Event::Resolve(vec![0]),
        Event::ConnectStart(0),
        Event::ConnectOk(0, None),
        Event::Resolve(vec![1]),
        Event::Resolve(vec![0]),
    ];
    runtime().block_on(async {
        let mut case = Case::new(Setup {
            lazy: false,
            connections_per_endpoint: 1,
            defer: false,
        });
        case.start(false).unwrap();
        for (index, event) in events.iter().enumerate() {
            case.apply(index, event).await.unwrap();
        }
        let snapshot = case.shared.snapshot();
        let listed: Vec<bool> = snapshot
            .endpoints
            .iter()
            .filter(|e| e.addr == address(0))
            .map(|e| e.draining)
            .collect();
        assert_eq!(listed.len(), 2, "one draining, one active: {snapshot:?}");
        let found = snapshot.endpoint(address(0)).expect("listed");
        assert!(!found.draining, "found the draining endpoint: {found:?}");
    });
}

proptest! {
    // No regression files: this crate keeps none.
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// After every registry call of any history, the registry agrees with the model: each
    /// connection's state, each endpoint's and the pool's aggregate by gRPC's rule, a picker
    /// holding exactly the Ready connections of active endpoints and preferring those with
    /// room, and the calls in flight on each connection and on the pool.
    #[test]
    fn every_step_agrees_with_the_model(
        setup in setup(),
        events in proptest::collection::vec(event(), 1..80),
    ) {
        run_case(setup, &events, false)?;
    }

    /// After any history, `close()` and the wind-down of every slot leave a Shutdown pool
    /// with no endpoint, an empty picker and no call counted in flight — agreeing with the
    /// model at every step on the way.
    #[test]
    fn close_then_wind_down_leaves_nothing(
        setup in setup(),
        events in proptest::collection::vec(event(), 0..80),
    ) {
        run_case(setup, &events, true)?;
    }
}
