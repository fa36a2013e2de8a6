//! The registry: every endpoint and connection of a pool, their states, and the picker.
//!
//! All state changes go through here, under one mutex, so that a change of a connection's
//! state, the aggregate states above it, the published picker and the notifications to
//! watchers are one consistent step. Changes are rare (connects, failures, resolutions); the
//! call path never takes this lock — it reads the picker through a generation number (see
//! [`crate::balance`]).
//!
//! It is the one owner of the endpoint set ([`EndpointEntry`]): the worker adds and drains
//! endpoints, slots report their connections' states through [`SlotEvents`], which the
//! registry implements.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{broadcast, watch};

use crate::balance::Picker;
use crate::config::Config;
use crate::conn::{ConnStats, Connection, Control, InFlight, SlotEvents};
use crate::endpoint::{ConnEntry, EndpointEntry, KeepAlive};
use crate::growth::{GrowthRequests, Room};
use crate::mailbox::{Mail, WeakMailbox};
use crate::outlier::{self, AddressOutliers, Change, OutlierDetection, Tally};
use crate::state::{
    aggregate, ConnectionSnapshot, ConnectivityState, Counters, EndpointSnapshot, PoolSnapshot,
    Scope, StateEvent,
};
use crate::target::Target;

/// How many state events a slow [`Pool::events`](crate::Pool::events) receiver may lag.
const EVENT_CAPACITY: usize = 4096;

pub(crate) type ReadyPicker = Picker<Arc<Connection>>;

/// The state every pool handle, call, connection task and the worker share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) target: Target,
    /// The runtime the pool's tasks run on (also the request-body tasks of streaming calls,
    /// whatever the caller's context).
    pub(crate) runtime: tokio::runtime::Handle,
    registry: Mutex<Registry>,
    picker: RwLock<Arc<ReadyPicker>>,
    /// Bumped after each picker publication; handles compare it to their cached copy.
    generation: AtomicU64,
    /// The round-robin cursor, shared by every pick.
    pub(crate) cursor: AtomicUsize,
    state_tx: watch::Sender<ConnectivityState>,
    /// Bumped on every change of any state; for waiters on snapshots.
    version_tx: watch::Sender<u64>,
    events_tx: broadcast::Sender<StateEvent>,
    /// Set by `close()` and by the worker's end: no new calls.
    shut_down: AtomicBool,
    /// Set when the pool should leave Idle (at build, or on the first call when lazy).
    connect_tx: watch::Sender<bool>,
    /// Bumped by `Pool::reset_connect_backoff`: slots backing off retry at once.
    backoff_resets: watch::Sender<u64>,
    /// Calls started over the whole pool (idle mode watches it).
    calls_started: AtomicU64,
    /// Calls in flight over the whole pool.
    pub(crate) in_flight: Arc<InFlight>,
    /// Signals ended calls to calls waiting for room (see [`Room`]).
    pub(crate) room: Arc<Room>,
    /// The worker's mailbox, weakly: re-resolution and growth requests go there.
    mailbox: WeakMailbox,
    /// Endpoints whose connections were all full when a call picked; the worker grows them.
    pub(crate) growth: GrowthRequests,
    /// Failed resolutions so far.
    resolve_errors: AtomicU64,
    /// Calls that failed before any connection took them.
    calls_without_connection: AtomicU64,
    /// The pool's metrics (with the `metrics` feature).
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Arc<crate::metrics::PoolMetrics>,
}

#[derive(Debug)]
struct Registry {
    endpoints: Vec<EndpointEntry>,
    pool_state: ConnectivityState,
    /// The pool's state while it has no endpoint (before the first resolution, or after an
    /// address set emptied): set by the worker.
    no_endpoints_state: ConnectivityState,
    next_id: u64,
    version: u64,
    last_error: Option<String>,
    last_resolve_error: Option<String>,
    /// When the pool entered its current state.
    pool_state_since: Instant,
    /// The counters of the endpoints the pool no longer has.
    removed: Counters,
}

impl Registry {
    /// The endpoint at `addr` that is in the address set (a draining one may share its
    /// address while its calls finish).
    fn active(&self, addr: SocketAddr) -> Option<&EndpointEntry> {
        self.endpoints
            .iter()
            .find(|e| e.addr == addr && !e.draining)
    }

    fn active_mut(&mut self, addr: SocketAddr) -> Option<&mut EndpointEntry> {
        self.endpoints
            .iter_mut()
            .find(|e| e.addr == addr && !e.draining)
    }
}

impl Shared {
    pub(crate) fn new(
        config: Config,
        target: Target,
        runtime: tokio::runtime::Handle,
        mailbox: WeakMailbox,
    ) -> Self {
        let initial = ConnectivityState::Idle;
        let (state_tx, _) = watch::channel(initial);
        let (version_tx, _) = watch::channel(0);
        let (events_tx, _) = broadcast::channel(EVENT_CAPACITY);
        let (connect_tx, _) = watch::channel(false);
        let seed = crate::backoff::FastRng::random_seed();
        #[cfg(feature = "metrics")]
        let target_name = target.to_string();
        Self {
            config: Arc::new(config),
            target,
            runtime,
            registry: Mutex::new(Registry {
                endpoints: Vec::new(),
                pool_state: initial,
                no_endpoints_state: initial,
                next_id: 0,
                version: 0,
                last_error: None,
                last_resolve_error: None,
                pool_state_since: Instant::now(),
                removed: Counters::default(),
            }),
            picker: RwLock::new(Arc::new(Picker::default())),
            generation: AtomicU64::new(0),
            // gRPC's round_robin starts at a random index, so that many clients built at
            // the same moment do not all hit the first address first.
            cursor: AtomicUsize::new(seed as usize),
            state_tx,
            version_tx,
            events_tx,
            shut_down: AtomicBool::new(false),
            connect_tx,
            backoff_resets: watch::channel(0).0,
            calls_started: AtomicU64::new(0),
            in_flight: Arc::new(InFlight::default()),
            room: Arc::new(Room::default()),
            mailbox,
            growth: GrowthRequests::default(),
            resolve_errors: AtomicU64::new(0),
            calls_without_connection: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metrics: Arc::new(crate::metrics::PoolMetrics::new(&target_name)),
        }
    }

    // === picker ===

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current picker and its generation.
    pub(crate) fn load_picker(&self) -> (u64, Arc<ReadyPicker>) {
        let picker = self.picker.read();
        // Read under the lock: the generation is bumped while the write lock is held, so the
        // pair is consistent.
        (self.generation.load(Ordering::Acquire), picker.clone())
    }

    /// Builds the picker of the pool's policy over the Ready connections of the active
    /// endpoints, grouped by address in the endpoint set's order (the order in which the
    /// resolver first gave them: pick first's preference).
    ///
    /// Endpoints that outlier detection ejected are left out — unless that would leave no
    /// Ready connection at all: then an outlier is better than failing every call (see
    /// [`crate::outlier`]).
    fn publish_picker(&self, registry: &Registry) {
        let has_ready = |e: &&EndpointEntry| e.conns.iter().any(|c| c.ready.is_some());
        let active = || registry.endpoints.iter().filter(|e| !e.draining);
        let all_ejected = !active().filter(has_ready).any(|e| !e.outliers.is_ejected());
        let by_address = active()
            .filter(|e| all_ejected || !e.outliers.is_ejected())
            .map(|e| e.conns.iter().filter_map(|c| c.ready.clone()).collect());
        let built = Picker::build(self.config.balance, by_address);
        let mut picker = self.picker.write();
        *picker = Arc::new(built);
        self.generation.fetch_add(1, Ordering::Release);
    }

    // === states ===

    pub(crate) fn state(&self) -> ConnectivityState {
        *self.state_tx.borrow()
    }

    pub(crate) fn subscribe_state(&self) -> watch::Receiver<ConnectivityState> {
        self.state_tx.subscribe()
    }

    pub(crate) fn subscribe_version(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    pub(crate) fn subscribe_events(&self) -> broadcast::Receiver<StateEvent> {
        self.events_tx.subscribe()
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::Acquire)
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.registry.lock().last_error.clone()
    }

    /// Asks the pool to leave Idle.
    pub(crate) fn request_connect(&self) {
        self.connect_tx
            .send_if_modified(|requested| !std::mem::replace(requested, true));
    }

    pub(crate) fn subscribe_connect(&self) -> watch::Receiver<bool> {
        self.connect_tx.subscribe()
    }

    /// The worker's mailbox, weakly (what a pushed address set is posted to).
    pub(crate) fn mailbox(&self) -> &WeakMailbox {
        &self.mailbox
    }

    /// Idle mode: the pool was not used for its idle timeout; its slots close their
    /// connections and wait, Idle, until the next call asks to connect again.
    pub(crate) fn request_idle(&self) {
        self.connect_tx
            .send_if_modified(|requested| std::mem::replace(requested, false));
    }

    /// Counts a call made on the pool (for idle mode).
    pub(crate) fn note_call(&self) {
        self.calls_started.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls made on the pool so far.
    pub(crate) fn calls_started(&self) -> u64 {
        self.calls_started.load(Ordering::Relaxed)
    }

    /// Tells every slot backing off to retry at once, its backoff restarted.
    pub(crate) fn reset_connect_backoff(&self) {
        self.backoff_resets.send_modify(|n| *n += 1);
    }

    pub(crate) fn subscribe_backoff_resets(&self) -> watch::Receiver<u64> {
        self.backoff_resets.subscribe()
    }

    /// Asks the worker to resolve again soon (rate-limited there).
    pub(crate) fn request_reresolve(&self) {
        self.mailbox.post(Mail::Reresolve);
    }

    /// Every connection was full when a call picked one of `addr`'s: ask for another.
    pub(crate) fn request_growth(&self, addr: SocketAddr) {
        if self.config.may_grow(addr) && self.growth.note(addr) {
            self.mailbox.post(Mail::Grow(addr));
        }
    }

    /// Whether every connection of the active endpoint at `addr` is Ready (no connect under
    /// way), and how many it has.
    pub(crate) fn endpoint_settled(&self, addr: SocketAddr) -> Option<(bool, usize)> {
        let reg = self.registry.lock();
        reg.active(addr).map(|e| (e.settled(), e.conns.len()))
    }

    /// Whether `addr` is about to get another Ready connection (see
    /// [`growth::room_coming`](crate::growth::room_coming)).
    pub(crate) fn room_coming(&self, addr: SocketAddr) -> bool {
        if !self.config.may_grow(addr) {
            return false;
        }
        let max = self.config.max_connections_for(addr);
        let reg = self.registry.lock();
        reg.active(addr).is_some_and(|e| e.room_coming(max))
    }

    /// The keepalive interval shared by `addr`'s connections.
    pub(crate) fn endpoint_keepalive(&self, addr: SocketAddr) -> Option<Arc<KeepAlive>> {
        let reg = self.registry.lock();
        reg.active(addr).map(|e| e.keepalive.clone())
    }

    /// Records a failed resolution (the last good addresses stay in use).
    pub(crate) fn record_resolve_error(&self, reason: &str) {
        self.resolve_errors.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.resolved(None);
        let mut reg = self.registry.lock();
        reg.last_resolve_error = Some(reason.to_owned());
        // Wake snapshot waiters: the failure is part of what they may wait for.
        reg.version += 1;
        self.version_tx.send_replace(reg.version);
    }

    pub(crate) fn resolve_errors(&self) -> u64 {
        self.resolve_errors.load(Ordering::Relaxed)
    }

    /// A resolution answered `addresses` addresses.
    pub(crate) fn record_resolution(&self, addresses: usize) {
        #[cfg(feature = "metrics")]
        self.metrics.resolved(Some(addresses));
        #[cfg(not(feature = "metrics"))]
        let _ = addresses;
    }

    /// A call failed with no connection to count it (see `PoolSnapshot::calls_without_connection`).
    pub(crate) fn call_failed_without_connection(&self) {
        self.calls_without_connection
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Registers a new connection slot for `addr` (creating the endpoint if needed).
    pub(crate) fn add_connection(
        &self,
        addr: SocketAddr,
        keepalive: &Arc<KeepAlive>,
        control: watch::Sender<Control>,
    ) -> (u64, Arc<ConnStats>) {
        let mut reg = self.registry.lock();
        let id = reg.next_id;
        reg.next_id += 1;
        let stats = ConnStats::new(self.in_flight.clone(), self.room.clone());
        #[cfg(feature = "metrics")]
        let stats = stats.with_metrics(self.metrics.clone());
        let stats = Arc::new(stats);
        // Slots are only added once the pool was asked to connect; starting them as
        // Connecting keeps the aggregate from flapping back to Idle.
        let initial = if *self.connect_tx.borrow() {
            ConnectivityState::Connecting
        } else {
            ConnectivityState::Idle
        };
        let conn = ConnEntry {
            id,
            state: initial,
            failed: false,
            ready: None,
            stats: stats.clone(),
            last_error: None,
            control,
            state_since: Instant::now(),
        };
        match reg.active_mut(addr) {
            Some(endpoint) => endpoint.conns.push(conn),
            None => reg.endpoints.push(EndpointEntry {
                addr,
                draining: false,
                state: initial,
                conns: vec![conn],
                keepalive: keepalive.clone(),
                state_since: Instant::now(),
                removed: Counters::default(),
                outliers: AddressOutliers::default(),
            }),
        }
        self.recompute(&mut reg, "connection added");
        (id, stats)
    }

    /// Whether `addr` has an endpoint in the address set.
    pub(crate) fn is_active(&self, addr: SocketAddr) -> bool {
        self.registry.lock().active(addr).is_some()
    }

    /// The addresses of the endpoints in the address set.
    pub(crate) fn active_addresses(&self) -> Vec<SocketAddr> {
        let reg = self.registry.lock();
        reg.endpoints
            .iter()
            .filter(|e| !e.draining)
            .map(|e| e.addr)
            .collect()
    }

    /// Tells every connection slot, draining ones included, what to do (the pool closes).
    pub(crate) fn control_all(&self, control: Control) {
        let reg = self.registry.lock();
        for conn in reg.endpoints.iter().flat_map(|e| &e.conns) {
            conn.control.send_replace(control);
        }
    }

    /// Marks an endpoint as leaving the address set: it is no longer picked, and its slots
    /// drain (calls in flight finish, bounded by the drain timeout).
    pub(crate) fn set_draining(&self, addr: SocketAddr) {
        let mut reg = self.registry.lock();
        if let Some(endpoint) = reg.active_mut(addr) {
            endpoint.draining = true;
            #[cfg(feature = "metrics")]
            self.metrics.drain();
            for conn in &endpoint.conns {
                conn.control.send_replace(Control::Drain);
            }
            tracing::debug!(%addr, "endpoint draining");
            self.publish_picker(&reg);
            self.recompute(&mut reg, "endpoint removed from the address set");
        }
    }

    /// One interval of outlier detection (gRFC A50, see [`crate::outlier`]) over the active
    /// endpoints, from their calls since the last one; republishes the picker if an endpoint
    /// was ejected or came back. `roll` gives a uniform number in 0..100.
    pub(crate) fn evaluate_outliers(
        &self,
        detection: &OutlierDetection,
        now: Instant,
        roll: &mut dyn FnMut() -> u32,
    ) {
        let mut reg = self.registry.lock();
        let mut active: Vec<&mut EndpointEntry> =
            reg.endpoints.iter_mut().filter(|e| !e.draining).collect();
        for endpoint in &mut active {
            let total = Tally::of(&endpoint.counters().calls);
            endpoint.outliers.end_interval(total);
        }
        let addrs: Vec<SocketAddr> = active.iter().map(|e| e.addr).collect();
        let mut states: Vec<&mut AddressOutliers> =
            active.into_iter().map(|e| &mut e.outliers).collect();
        let changes = outlier::evaluate(detection, now, &mut states, roll);
        if changes.is_empty() {
            return;
        }
        let ejected_now = states.iter().filter(|s| s.is_ejected()).count();
        for change in &changes {
            match change {
                Change::Ejected {
                    index,
                    reason,
                    success_rate,
                    volume,
                    duration,
                } => {
                    tracing::info!(
                        target = %self.target,
                        addr = %addrs[*index],
                        reason = reason.as_str(),
                        success_rate = format_args!("{:.1}%", success_rate * 100.0),
                        calls = volume,
                        ejected_for = ?duration,
                        "outlier ejected"
                    );
                    #[cfg(feature = "metrics")]
                    self.metrics.outlier_ejected(reason.as_str());
                }
                Change::Returned { index } => {
                    tracing::info!(target = %self.target, addr = %addrs[*index], "outlier ejection ended");
                }
            }
        }
        #[cfg(feature = "metrics")]
        self.metrics.outliers_ejected(ejected_now);
        #[cfg(not(feature = "metrics"))]
        let _ = ejected_now;
        self.publish_picker(&reg);
        self.recompute(&mut reg, "outlier detection");
    }

    /// Forgets a connection whose task ended.
    pub(crate) fn remove_connection(&self, id: u64) {
        let mut reg = self.registry.lock();
        let mut was_ready = false;
        for endpoint in &mut reg.endpoints {
            if let Some(i) = endpoint.conns.iter().position(|c| c.id == id) {
                was_ready = endpoint.conns[i].ready.is_some();
                let conn = endpoint.conns.remove(i);
                // Its counts stay with its endpoint.
                endpoint.removed.add(&conn.stats.counters());
            }
        }
        let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut reg.endpoints)
            .into_iter()
            .partition(|e| !e.conns.is_empty());
        reg.endpoints = kept;
        for endpoint in gone {
            // And an endpoint's with the pool.
            reg.removed.add(&endpoint.removed);
        }
        if was_ready {
            self.publish_picker(&reg);
        }
        self.recompute(&mut reg, "connection removed");
    }

    /// Records a state change of one connection, with its new sender when Ready.
    pub(crate) fn transition(
        &self,
        id: u64,
        to: ConnectivityState,
        reason: &str,
        ready: Option<Arc<Connection>>,
    ) {
        let mut reg = self.registry.lock();
        let Some((addr, conn)) = reg.endpoints.iter_mut().find_map(|e| {
            let addr = e.addr;
            e.conns.iter_mut().find(|c| c.id == id).map(|c| (addr, c))
        }) else {
            return;
        };
        let from = conn.state;
        let had_ready = conn.ready.is_some();
        conn.state = to;
        if from != to {
            conn.state_since = Instant::now();
        }
        match to {
            ConnectivityState::Ready => {
                conn.failed = false;
                conn.ready = ready;
            }
            ConnectivityState::TransientFailure => {
                conn.failed = true;
                conn.ready = None;
                conn.last_error = Some(reason.to_owned());
            }
            _ => conn.ready = None,
        }
        let changed_ready = had_ready || conn.ready.is_some();
        if to == ConnectivityState::TransientFailure {
            reg.last_error = Some(format!("{addr}: {reason}"));
        }
        if from != to {
            // Emitted from the slot's task: its `conn{addr, id}` span names the connection.
            tracing::debug!(%from, %to, reason, "connection state");
            let _ = self.events_tx.send(StateEvent {
                scope: Scope::Connection { addr, id },
                from,
                to,
                reason: reason.to_owned(),
            });
        }
        if changed_ready {
            self.publish_picker(&reg);
        }
        self.recompute(&mut reg, reason);
    }

    /// Sets the pool's state for when it has no endpoint (resolution pending or failed).
    pub(crate) fn set_no_endpoints_state(&self, state: ConnectivityState, reason: &str) {
        let mut reg = self.registry.lock();
        reg.no_endpoints_state = state;
        if state == ConnectivityState::TransientFailure {
            reg.last_error = Some(reason.to_owned());
        }
        self.recompute(&mut reg, reason);
    }

    /// The pool is closed: no new calls, state Shutdown for good.
    pub(crate) fn shut_down(&self, reason: &str) {
        self.shut_down.store(true, Ordering::Release);
        let mut reg = self.registry.lock();
        self.recompute(&mut reg, reason);
    }

    /// Recomputes endpoint and pool aggregates, notifying what changed.
    fn recompute(&self, reg: &mut Registry, reason: &str) {
        for endpoint in &mut reg.endpoints {
            let new = endpoint.aggregate();
            if new != endpoint.state {
                let from = std::mem::replace(&mut endpoint.state, new);
                endpoint.state_since = Instant::now();
                tracing::debug!(addr = %endpoint.addr, %from, to = %new, reason, "endpoint state");
                let _ = self.events_tx.send(StateEvent {
                    scope: Scope::Endpoint(endpoint.addr),
                    from,
                    to: new,
                    reason: reason.to_owned(),
                });
            }
        }
        let active: Vec<ConnectivityState> = reg
            .endpoints
            .iter()
            .filter(|e| !e.draining)
            .map(|e| e.state)
            .collect();
        #[cfg(feature = "metrics")]
        self.metrics.endpoints(
            active.len(),
            active
                .iter()
                .filter(|s| **s == ConnectivityState::Ready)
                .count(),
        );
        let new = if self.is_shut_down() {
            ConnectivityState::Shutdown
        } else if active.is_empty() {
            reg.no_endpoints_state
        } else {
            aggregate(active)
        };
        if new != reg.pool_state {
            let from = std::mem::replace(&mut reg.pool_state, new);
            reg.pool_state_since = Instant::now();
            tracing::info!(%from, to = %new, reason, "pool state");
            let _ = self.events_tx.send(StateEvent {
                scope: Scope::Pool,
                from,
                to: new,
                reason: reason.to_owned(),
            });
            self.state_tx.send_replace(new);
        }
        reg.version += 1;
        self.version_tx.send_replace(reg.version);
    }

    pub(crate) fn snapshot(&self) -> PoolSnapshot {
        let reg = self.registry.lock();
        let endpoints: Vec<EndpointSnapshot> = reg
            .endpoints
            .iter()
            .map(|e| EndpointSnapshot {
                addr: e.addr,
                state: e.state,
                draining: e.draining,
                keepalive_interval: e.keepalive.interval(),
                state_since: e.state_since,
                counters: e.counters(),
                ejected: e.outliers.is_ejected(),
                ejection_count: e.outliers.ejections,
                connections: e
                    .conns
                    .iter()
                    .map(|c| ConnectionSnapshot {
                        id: c.id,
                        state: c.state,
                        in_flight: c.ready.as_ref().map_or(0, |r| r.in_flight()),
                        calls: c.stats.calls(),
                        connects: c.stats.connects(),
                        max_concurrent_streams: c
                            .ready
                            .as_ref()
                            .map(|r| r.limits.max_concurrent_streams())
                            .filter(|m| *m != u32::MAX),
                        last_error: c.last_error.clone(),
                        state_since: c.state_since,
                        counters: c.stats.counters(),
                    })
                    .collect(),
            })
            .collect();
        let mut counters = reg.removed.clone();
        for endpoint in &endpoints {
            counters.add(&endpoint.counters);
        }
        PoolSnapshot {
            state: reg.pool_state,
            last_error: reg.last_error.clone(),
            last_resolve_error: reg.last_resolve_error.clone(),
            resolve_errors: self.resolve_errors(),
            state_since: reg.pool_state_since,
            counters,
            calls_without_connection: self.calls_without_connection.load(Ordering::Relaxed),
            endpoints,
        }
    }
}

impl SlotEvents for Shared {
    fn transition(
        &self,
        id: u64,
        to: ConnectivityState,
        reason: &str,
        ready: Option<Arc<Connection>>,
    ) {
        Shared::transition(self, id, to, reason, ready);
    }

    fn removed(&self, id: u64) {
        self.remove_connection(id);
    }

    fn reresolve(&self) {
        self.request_reresolve();
    }
}
