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
//!
//! # Cost per change
//!
//! A pool can hold tens of thousands of connections, and each of them changes state a few
//! times in its life (Connecting, Ready, Shutdown) — often all at once, at start-up and at
//! `close()`. So a change costs O(1), amortised, whatever the pool's size:
//!
//! - **Finding the connection**: a map from connection id to its endpoint's key, then a
//!   binary search among that endpoint's connections (kept in id order). Endpoints live in a
//!   map by a key that only grows, so iterating them keeps the order they were added in, and
//!   removing one touches nothing else; a second map gives the active endpoint of each
//!   address. Pick first's preference, the latest address set's order, is a third map
//!   (address → rank) that only its publication reads.
//! - **Aggregates**: each endpoint counts its connections per state ([`StateCounts`]), the
//!   registry counts the active endpoints per state and their connections per state. A change
//!   moves one connection between two counts, re-aggregates its endpoint from its counts and,
//!   if that changed, moves the endpoint between two counts of the pool: O(1). The counts
//!   are also [`PoolSummary`], which costs O(1) to read.
//! - **The picker** (see [`Publication`]): building one is O(n), so not every change builds
//!   one. A change that calls must see at once is published at once: a connection that
//!   leaves the Ready set while a call could still pick it (an endpoint drains, outlier
//!   detection ejects one, the health Watch says NOT_SERVING on an open connection), or a
//!   Ready connection when the published picker holds no live one (calls wait for it). The
//!   other changes — a Ready connection while others are there to take calls, a connection
//!   that left Ready already unusable (a pick steps over it: [`Pickable::is_available`]) —
//!   mark the picker stale, and one deferred publication takes them all, spaced so that
//!   publishing costs a small share of a core. Pools of up to [`PUBLISH_AT_ONCE_UP_TO`] Ready
//!   connections, where a build costs a few microseconds, publish every change at once.
//!   Once the pool is shut down it offers no connection (calls are refused): its picker is
//!   emptied once, and the thousands of connections leaving at `close()` publish nothing.

use crate::addr::EndpointAddr;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::balance::{Balance, Pickable, Picker};
use crate::config::Config;
use crate::conn::{ConnStats, Connection, Control, InFlight, SlotEvents};
use crate::endpoint::{ConnEntry, EndpointEntry, KeepAlive};
use crate::growth::{GrowthRequests, Room};
use crate::mailbox::{Mail, WeakMailbox};
use crate::outlier::{self, AddressOutliers, Change, OutlierDetection, Tally};
use crate::state::{
    ConnectionSnapshot, ConnectivityState, Counters, EndpointSnapshot, EventSender, PoolSnapshot,
    PoolSummary, Scope, StateCounts, StateEvent, StateEvents,
};
use crate::target::Target;

pub(crate) type ReadyPicker = Picker<Arc<Connection>>;

/// Up to this many Ready connections, every change of the Ready set is published at once: a
/// build then costs about a microsecond, and small pools behave exactly as if every change
/// were published. Above it, publishing every change made the start-up of 250 connections
/// over 250 addresses cost ~30 µs more per connection (benches/RESULTS.md, section 24).
pub(crate) const PUBLISH_AT_ONCE_UP_TO: usize = 32;

/// A deferred publication waits this many times as long as the last build took, so that
/// building pickers takes at most about a tenth of a core however fast changes come.
const PUBLICATION_SPACING: u32 = 9;

/// How far apart, per connection of the pool, [`Pool::wait_until`](crate::Pool::wait_until)
/// checks its condition at least. Below [`TIMER_RESOLUTION`] (pools of up to 400
/// connections) it checks after every change; above, also at least
/// [`SNAPSHOT_SPACING`] times as long as the last check took apart, so that checking
/// takes at most about a tenth of a core however fast the pool changes.
const SNAPSHOT_SPACING_PER_CONNECTION: Duration = Duration::from_nanos(2_500);

/// See [`SNAPSHOT_SPACING_PER_CONNECTION`].
const SNAPSHOT_SPACING: u32 = 9;

/// Below this, a deferred publication does not wait on a timer (whose resolution is a
/// millisecond): it runs once the tasks already woken have run, which still batches the
/// changes they make.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// The state every pool handle, call, connection task and the worker share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) target: Target,
    /// The runtime the pool's tasks run on (also the request-body tasks of streaming calls,
    /// whatever the caller's context).
    pub(crate) runtime: tokio::runtime::Handle,
    /// Itself, weakly: what a deferred publication holds on to.
    this: Weak<Shared>,
    registry: Mutex<Registry>,
    picker: RwLock<Arc<ReadyPicker>>,
    /// Bumped after each picker publication; handles compare it to their cached copy.
    generation: AtomicU64,
    /// The round-robin cursor, shared by every pick.
    pub(crate) cursor: AtomicUsize,
    state_tx: watch::Sender<ConnectivityState>,
    /// Bumped on every change of any state; for waiters on snapshots.
    version_tx: watch::Sender<u64>,
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
    /// Every endpoint, draining ones included, by a key that only grows: iterating gives the
    /// order they were added in.
    endpoints: BTreeMap<u64, EndpointEntry>,
    next_endpoint: u64,
    /// The key of the active (not draining) endpoint of each address.
    active: HashMap<EndpointAddr, u64>,
    /// The key of each connection's endpoint.
    conn_endpoint: HashMap<u64, u64>,
    /// Each address's place in the latest address set (pick first's preference: resolver
    /// order); addresses it does not list come after, in the order they were added.
    rank: HashMap<EndpointAddr, usize>,
    /// The active endpoints, by their aggregate state.
    endpoint_states: StateCounts,
    /// The connections of active endpoints, by their state.
    connection_states: StateCounts,
    draining_endpoints: usize,
    draining_connections: usize,
    /// Active endpoints that outlier detection ejected.
    ejected_endpoints: usize,
    publication: Publication,
    /// Where every transition goes, numbered under the lock.
    events: EventSender,
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
    /// When it was shut down (the close timeout runs from there).
    shut_down_at: Option<tokio::time::Instant>,
    /// The counters of the endpoints the pool no longer has.
    removed: Counters,
}

/// Where the published picker stands against the registry (see the module docs).
#[derive(Debug)]
struct Publication {
    /// The Ready set changed since the last build.
    stale: bool,
    /// A deferred publication is on its way.
    scheduled: bool,
    /// Entries of the published picker whose connection is still Ready in the registry:
    /// when none is left, calls have nothing to pick.
    live_entries: usize,
    /// How long the last build took (what spaces deferred ones).
    last_cost: Duration,
    /// Up to this many Ready connections, every change is published at once
    /// ([`PUBLISH_AT_ONCE_UP_TO`]; lowered by tests of the deferred path).
    at_once_up_to: usize,
}

impl Registry {
    /// The endpoint at `addr` that is in the address set (a draining one may share its
    /// address while its calls finish).
    fn active(&self, addr: &EndpointAddr) -> Option<&EndpointEntry> {
        self.active
            .get(addr)
            .and_then(|key| self.endpoints.get(key))
    }
}

impl Shared {
    pub(crate) fn new(
        config: Config,
        target: Target,
        runtime: tokio::runtime::Handle,
        mailbox: WeakMailbox,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self::with_self(config, target, runtime, mailbox, this.clone()))
    }

    fn with_self(
        config: Config,
        target: Target,
        runtime: tokio::runtime::Handle,
        mailbox: WeakMailbox,
        this: Weak<Shared>,
    ) -> Self {
        let initial = ConnectivityState::Idle;
        let (state_tx, _) = watch::channel(initial);
        let (version_tx, _) = watch::channel(0);
        let (connect_tx, _) = watch::channel(false);
        let seed = crate::backoff::FastRng::random_seed();
        #[cfg(feature = "metrics")]
        let target_name = target.canonical();
        Self {
            config: Arc::new(config),
            target,
            runtime,
            this,
            registry: Mutex::new(Registry {
                endpoints: BTreeMap::new(),
                next_endpoint: 0,
                rank: HashMap::new(),
                active: HashMap::new(),
                conn_endpoint: HashMap::new(),
                endpoint_states: StateCounts::default(),
                connection_states: StateCounts::default(),
                draining_endpoints: 0,
                draining_connections: 0,
                ejected_endpoints: 0,
                publication: Publication {
                    stale: false,
                    scheduled: false,
                    live_entries: 0,
                    last_cost: Duration::ZERO,
                    at_once_up_to: PUBLISH_AT_ONCE_UP_TO,
                },
                events: EventSender::new(),
                pool_state: initial,
                no_endpoints_state: initial,
                next_id: 0,
                version: 0,
                last_error: None,
                last_resolve_error: None,
                pool_state_since: Instant::now(),
                shut_down_at: None,
                removed: Counters::default(),
            }),
            picker: RwLock::new(Arc::new(Picker::default())),
            generation: AtomicU64::new(0),
            // gRPC's round_robin starts at a random index, so that many clients built at
            // the same moment do not all hit the first address first.
            cursor: AtomicUsize::new(seed as usize),
            state_tx,
            version_tx,
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
            metrics: crate::metrics::PoolMetrics::new(&target_name),
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
    /// resolver first gave them: pick first's preference), and publishes it. O(n): see the
    /// module docs for when it runs.
    ///
    /// Endpoints that outlier detection ejected are left out — unless that would leave no
    /// Ready connection at all: then an outlier is better than failing every call (see
    /// [`crate::outlier`]).
    ///
    /// A pool that was shut down publishes an empty picker, once: calls are refused from
    /// then on, and its connections leaving one by one (thousands at `close()`) publish nothing.
    fn publish_picker(&self, reg: &mut Registry) {
        let started = Instant::now();
        let shut_down = self.is_shut_down();
        let has_ready = |e: &EndpointEntry| e.conns.iter().any(|c| c.ready.is_some());
        let all_ejected = !reg
            .endpoints
            .values()
            .filter(|e| !e.draining && has_ready(e))
            .any(|e| !e.outliers.is_ejected());
        let mut by_address = Vec::with_capacity(reg.active.len());
        let mut ranks = Vec::new();
        let by_rank = self.config.balance == Balance::PickFirst;
        for endpoint in reg.endpoints.values_mut() {
            let included = !shut_down
                && !endpoint.draining
                && (all_ejected || !endpoint.outliers.is_ejected());
            let mut group = Vec::new();
            for conn in &mut endpoint.conns {
                conn.published = included && conn.ready.is_some();
                if conn.published {
                    group.extend(conn.ready.clone());
                }
            }
            if !group.is_empty() {
                if by_rank {
                    ranks.push(reg.rank.get(&endpoint.addr).copied().unwrap_or(usize::MAX));
                }
                by_address.push(group);
            }
        }
        if by_rank {
            // Pick first prefers the resolver's order; a stable sort keeps the order of
            // addition among addresses the latest set does not list.
            let mut ranked: Vec<_> = ranks.into_iter().zip(by_address).collect();
            ranked.sort_by_key(|(rank, _)| *rank);
            by_address = ranked.into_iter().map(|(_, group)| group).collect();
        }
        let built = Arc::new(Picker::build(self.config.balance, by_address));
        let publication = &mut reg.publication;
        publication.live_entries = built.len();
        publication.stale = false;
        let previous = {
            let mut picker = self.picker.write();
            let previous = std::mem::replace(&mut *picker, built);
            self.generation.fetch_add(1, Ordering::Release);
            previous
        };
        // The old picker's entries are let go of outside the picker's lock.
        drop(previous);
        publication.last_cost = started.elapsed();
    }

    /// The Ready set changed (a connection entered it, or left it; `urgent` when calls could
    /// still pick the one that left): publishes now or later (see the module docs).
    fn ready_set_changed(&self, reg: &mut Registry, urgent: bool) {
        if self.is_shut_down() {
            // Its picker is empty for good (see `shut_down`).
            return;
        }
        let ready = reg.connection_states.ready;
        let publication = &mut reg.publication;
        let nothing_live = publication.live_entries == 0 && ready > 0;
        if urgent || nothing_live || ready <= publication.at_once_up_to {
            self.publish_picker(reg);
            return;
        }
        publication.stale = true;
        if std::mem::replace(&mut publication.scheduled, true) {
            return;
        }
        let wait = publication.last_cost * PUBLICATION_SPACING;
        let this = self.this.clone();
        self.runtime.spawn(async move {
            if wait >= TIMER_RESOLUTION {
                tokio::time::sleep(wait).await;
            } else {
                tokio::task::yield_now().await;
            }
            if let Some(shared) = this.upgrade() {
                let mut reg = shared.registry.lock();
                reg.publication.scheduled = false;
                shared.publish_if_stale(&mut reg);
            }
        });
    }

    /// Publishes the changes a deferred publication is waiting for, and wakes the waiters
    /// on the pool's changes (calls waiting for a connection look again).
    fn publish_if_stale(&self, reg: &mut Registry) {
        if reg.publication.stale {
            self.publish_picker(reg);
            self.bump_version(reg);
        }
    }

    /// Defers every change of the Ready set it may defer, whatever the pool's size (tests of
    /// the deferred path on small pools).
    #[cfg(test)]
    pub(crate) fn defer_publications(&self) {
        self.registry.lock().publication.at_once_up_to = 0;
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

    /// Every transition from now on (see [`StateEvents`]).
    pub(crate) fn subscribe_events(&self) -> StateEvents {
        self.registry.lock().events.subscribe()
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
    pub(crate) fn request_growth(&self, addr: &EndpointAddr) {
        if self.config.may_grow(addr) && self.growth.note(addr) {
            self.mailbox.post(Mail::Grow(addr.clone()));
        }
    }

    /// Whether every connection of the active endpoint at `addr` is Ready (no connect under
    /// way), and how many it has.
    pub(crate) fn endpoint_settled(&self, addr: &EndpointAddr) -> Option<(bool, usize)> {
        let reg = self.registry.lock();
        reg.active(addr).map(|e| (e.settled(), e.conns.len()))
    }

    /// Whether `addr` is about to get another Ready connection (see
    /// [`growth::room_coming`](crate::growth::room_coming)).
    pub(crate) fn room_coming(&self, addr: &EndpointAddr) -> bool {
        if !self.config.may_grow(addr) {
            return false;
        }
        let max = self.config.max_connections_for(addr);
        let reg = self.registry.lock();
        reg.active(addr).is_some_and(|e| e.room_coming(max))
    }

    /// The keepalive interval shared by `addr`'s connections.
    pub(crate) fn endpoint_keepalive(&self, addr: &EndpointAddr) -> Option<Arc<KeepAlive>> {
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
        self.bump_version(&mut reg);
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
        addr: EndpointAddr,
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
            published: false,
            stats: stats.clone(),
            last_error: None,
            control,
            state_since: Instant::now(),
        };
        let reg = &mut *reg;
        let key = match reg.active.get(&addr) {
            Some(&key) => key,
            None => {
                let key = reg.next_endpoint;
                reg.next_endpoint += 1;
                reg.endpoints.insert(
                    key,
                    EndpointEntry {
                        addr: addr.clone(),
                        draining: false,
                        state: initial,
                        conns: Vec::new(),
                        counts: StateCounts::default(),
                        keepalive: keepalive.clone(),
                        state_since: Instant::now(),
                        removed: Counters::default(),
                        outliers: AddressOutliers::default(),
                    },
                );
                reg.active.insert(addr, key);
                reg.endpoint_states.add(initial);
                key
            }
        };
        if let Some(endpoint) = reg.endpoints.get_mut(&key) {
            // Ids only grow: pushing keeps the endpoint's connections in id order.
            endpoint.conns.push(conn);
            endpoint.counts.add(initial);
        }
        reg.connection_states.add(initial);
        reg.conn_endpoint.insert(id, key);
        self.refresh(reg, Some(key), "connection added");
        (id, stats)
    }

    /// Whether `addr` has an endpoint in the address set.
    pub(crate) fn is_active(&self, addr: &EndpointAddr) -> bool {
        self.registry.lock().active.contains_key(addr)
    }

    /// The addresses of the endpoints in the address set, in the order they were added.
    pub(crate) fn active_addresses(&self) -> Vec<EndpointAddr> {
        let reg = self.registry.lock();
        reg.endpoints
            .values()
            .filter(|e| !e.draining)
            .map(|e| e.addr.clone())
            .collect()
    }

    /// Records the order of the latest address set (resolved or pushed, before subsetting):
    /// pick first prefers its addresses in that order. Republishes the picker if the order
    /// of its Ready addresses may have changed.
    pub(crate) fn set_address_order(&self, addresses: &[EndpointAddr]) {
        if self.config.balance != Balance::PickFirst {
            // Only pick first reads it.
            return;
        }
        let mut reg = self.registry.lock();
        let rank: HashMap<EndpointAddr, usize> = addresses
            .iter()
            .enumerate()
            .rev()
            .map(|(i, addr)| (addr.clone(), i))
            .collect();
        if rank == reg.rank {
            return;
        }
        reg.rank = rank;
        if !self.is_shut_down() {
            self.publish_picker(&mut reg);
        }
    }

    /// Tells every connection slot, draining ones included, what to do (the pool closes).
    pub(crate) fn control_all(&self, control: Control) {
        let reg = self.registry.lock();
        for conn in reg.endpoints.values().flat_map(|e| &e.conns) {
            conn.control.send_replace(control);
        }
    }

    /// Marks an endpoint as leaving the address set: it is no longer picked, and its slots
    /// drain (calls in flight finish, bounded by the drain timeout).
    pub(crate) fn set_draining(&self, addr: &EndpointAddr) {
        let mut reg = self.registry.lock();
        let reg = &mut *reg;
        let Some(key) = reg.active.remove(addr) else {
            return;
        };
        let Some(endpoint) = reg.endpoints.get_mut(&key) else {
            return;
        };
        endpoint.draining = true;
        #[cfg(feature = "metrics")]
        self.metrics.drain();
        let mut published = false;
        for conn in &endpoint.conns {
            conn.control.send_replace(Control::Drain);
            reg.connection_states.remove(conn.state);
            published |= conn.published;
        }
        reg.draining_connections += endpoint.conns.len();
        reg.draining_endpoints += 1;
        if endpoint.outliers.is_ejected() {
            reg.ejected_endpoints = reg.ejected_endpoints.saturating_sub(1);
        }
        reg.endpoint_states.remove(endpoint.state);
        tracing::debug!(%addr, "endpoint draining");
        if published {
            // Its connections still take calls: out of the picker at once.
            self.publish_picker(reg);
        }
        self.refresh(reg, None, "endpoint removed from the address set");
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
            reg.endpoints.values_mut().filter(|e| !e.draining).collect();
        for endpoint in &mut active {
            let total = Tally::of(&endpoint.counters().calls);
            endpoint.outliers.end_interval(total);
        }
        let addrs: Vec<EndpointAddr> = active.iter().map(|e| e.addr.clone()).collect();
        let mut states: Vec<&mut AddressOutliers> =
            active.into_iter().map(|e| &mut e.outliers).collect();
        let changes = outlier::evaluate(detection, now, &mut states, roll);
        if changes.is_empty() {
            return;
        }
        let ejected_now = states.iter().filter(|s| s.is_ejected()).count();
        reg.ejected_endpoints = ejected_now;
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
        self.publish_picker(&mut reg);
        self.refresh(&mut reg, None, "outlier detection");
    }

    /// Forgets a connection whose task ended: O(1), and its endpoint with it once it has no
    /// connection left.
    pub(crate) fn remove_connection(&self, id: u64) {
        let mut reg = self.registry.lock();
        let reg = &mut *reg;
        let Some(key) = reg.conn_endpoint.remove(&id) else {
            return;
        };
        let Some(endpoint) = reg.endpoints.get_mut(&key) else {
            return;
        };
        let Some(index) = endpoint.position(id) else {
            return;
        };
        let conn = endpoint.conns.remove(index);
        // Its counts stay with its endpoint.
        endpoint.removed.add(&conn.stats.counters());
        endpoint.counts.remove(conn.effective());
        let draining = endpoint.draining;
        let emptied = endpoint.conns.is_empty();
        if draining {
            reg.draining_connections -= 1;
        } else {
            reg.connection_states.remove(conn.state);
        }
        let mut urgent = false;
        if conn.published {
            reg.publication.live_entries -= 1;
            urgent = conn.ready.as_ref().is_some_and(Pickable::is_available);
        }
        if emptied {
            if let Some(endpoint) = reg.endpoints.remove(&key) {
                if draining {
                    reg.draining_endpoints -= 1;
                } else {
                    reg.endpoint_states.remove(endpoint.state);
                    reg.active.remove(&endpoint.addr);
                    if endpoint.outliers.is_ejected() {
                        reg.ejected_endpoints = reg.ejected_endpoints.saturating_sub(1);
                    }
                }
                // And an endpoint's with the pool.
                reg.removed.add(&endpoint.removed);
            }
        }
        if conn.ready.is_some() && !draining {
            self.ready_set_changed(reg, urgent);
        }
        self.refresh(reg, (!emptied).then_some(key), "connection removed");
    }

    /// Records a state change of one connection, with its new sender when Ready: O(1)
    /// amortised (see the module docs).
    pub(crate) fn transition(
        &self,
        id: u64,
        to: ConnectivityState,
        reason: &str,
        ready: Option<Arc<Connection>>,
    ) {
        let mut reg = self.registry.lock();
        let reg = &mut *reg;
        let Some(&key) = reg.conn_endpoint.get(&id) else {
            return;
        };
        let Some(endpoint) = reg.endpoints.get_mut(&key) else {
            return;
        };
        let Some(index) = endpoint.position(id) else {
            return;
        };
        let (addr, draining) = (endpoint.addr.clone(), endpoint.draining);
        let conn = &mut endpoint.conns[index];
        let from = conn.state;
        let counted_as = conn.effective();
        let previous = conn.ready.take();
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
                conn.last_error = Some(reason.to_owned());
            }
            _ => {}
        }
        endpoint.counts.moved(counted_as, conn.effective());
        let same = matches!((&previous, &conn.ready), (Some(a), Some(b)) if Arc::ptr_eq(a, b));
        let mut ready_changed = false;
        let mut urgent = false;
        if !same {
            if let Some(previous) = &previous {
                ready_changed = true;
                if std::mem::replace(&mut conn.published, false) {
                    reg.publication.live_entries -= 1;
                    // A call could still pick it (the health Watch's NOT_SERVING on an open
                    // connection); else a pick steps over it until the next publication.
                    urgent = previous.is_available();
                }
            }
            ready_changed |= conn.ready.is_some();
        }
        if !draining {
            reg.connection_states.moved(from, to);
        }
        if to == ConnectivityState::TransientFailure {
            reg.last_error = Some(format!("{addr}: {reason}"));
        }
        if from != to {
            // Emitted from the slot's task: its `conn{addr, id}` span names the connection.
            tracing::debug!(%from, %to, reason, "connection state");
            reg.events.send(StateEvent {
                scope: Scope::Connection { addr, id },
                from,
                to,
                reason: reason.to_owned(),
            });
        }
        if ready_changed && !draining {
            self.ready_set_changed(reg, urgent);
        }
        self.refresh(reg, Some(key), reason);
    }

    /// Sets the pool's state for when it has no endpoint (resolution pending or failed).
    pub(crate) fn set_no_endpoints_state(&self, state: ConnectivityState, reason: &str) {
        let mut reg = self.registry.lock();
        reg.no_endpoints_state = state;
        if state == ConnectivityState::TransientFailure {
            reg.last_error = Some(reason.to_owned());
        }
        self.refresh(&mut reg, None, reason);
    }

    /// The pool is closed: no new calls, state Shutdown for good.
    pub(crate) fn shut_down(&self, reason: &str) {
        let mut reg = self.registry.lock();
        let first = !self.shut_down.swap(true, Ordering::AcqRel);
        reg.shut_down_at
            .get_or_insert_with(tokio::time::Instant::now);
        if first {
            // Calls are refused from now on: no connection is offered any more.
            self.publish_picker(&mut reg);
        }
        self.refresh(&mut reg, None, reason);
    }

    /// When the pool was shut down, if it was.
    pub(crate) fn shut_down_at(&self) -> Option<tokio::time::Instant> {
        self.registry.lock().shut_down_at
    }

    /// Re-aggregates the endpoint at `key` (when one changed) and the pool, from their
    /// counts, notifying what changed: O(1).
    fn refresh(&self, reg: &mut Registry, key: Option<u64>, reason: &str) {
        if let Some(endpoint) = key.and_then(|key| reg.endpoints.get_mut(&key)) {
            let new = endpoint.aggregate();
            if new != endpoint.state {
                let from = std::mem::replace(&mut endpoint.state, new);
                endpoint.state_since = Instant::now();
                tracing::debug!(addr = %endpoint.addr, %from, to = %new, reason, "endpoint state");
                reg.events.send(StateEvent {
                    scope: Scope::Endpoint(endpoint.addr.clone()),
                    from,
                    to: new,
                    reason: reason.to_owned(),
                });
                if !endpoint.draining {
                    reg.endpoint_states.moved(from, new);
                }
            }
        }
        let active = reg.endpoint_states;
        #[cfg(feature = "metrics")]
        self.metrics.endpoints(active.total(), active.ready);
        let new = if self.is_shut_down() {
            ConnectivityState::Shutdown
        } else if active.total() == 0 {
            reg.no_endpoints_state
        } else {
            active.aggregate()
        };
        if new != reg.pool_state {
            let from = std::mem::replace(&mut reg.pool_state, new);
            reg.pool_state_since = Instant::now();
            tracing::info!(%from, to = %new, reason, "pool state");
            reg.events.send(StateEvent {
                scope: Scope::Pool,
                from,
                to: new,
                reason: reason.to_owned(),
            });
            self.state_tx.send_replace(new);
        }
        self.bump_version(reg);
    }

    /// Wakes the waiters on any change of the pool (snapshots, calls waiting for a connection).
    fn bump_version(&self, reg: &mut Registry) {
        reg.version += 1;
        self.version_tx.send_replace(reg.version);
    }

    /// The pool in a few numbers, from the counts it keeps: O(1).
    pub(crate) fn summary(&self) -> PoolSummary {
        let reg = self.registry.lock();
        PoolSummary {
            state: reg.pool_state,
            connections: reg.connection_states,
            endpoints: reg.endpoint_states,
            draining_endpoints: reg.draining_endpoints,
            draining_connections: reg.draining_connections,
            ejected_endpoints: reg.ejected_endpoints,
            in_flight: self.in_flight.get(),
        }
    }

    /// How many connections the pool has, draining ones included.
    pub(crate) fn connection_count(&self) -> usize {
        let reg = self.registry.lock();
        reg.connection_states.total() + reg.draining_connections
    }

    /// Waits until `condition` holds for a snapshot (the wait of
    /// [`Pool::wait_until`](crate::Pool::wait_until), whose docs say how often it checks);
    /// `false` if the pool is gone first and it does not hold then.
    pub(crate) async fn wait_until_snapshot(
        &self,
        mut condition: impl FnMut(&PoolSnapshot) -> bool,
    ) -> bool {
        let mut version = self.subscribe_version();
        loop {
            version.borrow_and_update();
            let checked = tokio::time::Instant::now();
            let started = Instant::now();
            if condition(&self.snapshot()) {
                return true;
            }
            let cost = started.elapsed();
            if version.changed().await.is_err() {
                return condition(&self.snapshot());
            }
            let connections = self.connection_count().min(1 << 20) as u32;
            let spacing = SNAPSHOT_SPACING_PER_CONNECTION * connections;
            if spacing >= TIMER_RESOLUTION {
                // Changes made meanwhile are seen by the next check.
                let spacing = spacing.max(cost * SNAPSHOT_SPACING);
                tokio::time::sleep_until(checked + spacing).await;
            }
        }
    }

    /// Every endpoint and connection: O(n). A publication of the picker that is pending is
    /// made first, so that what the snapshot shows Ready is what calls can pick.
    pub(crate) fn snapshot(&self) -> PoolSnapshot {
        // What the snapshot counts, the metrics have seen.
        #[cfg(feature = "metrics")]
        self.metrics.flush();
        let mut reg = self.registry.lock();
        self.publish_if_stale(&mut reg);
        self.snapshot_of(&reg)
    }

    /// The snapshot, leaving a pending publication pending (tests of deferred publication).
    #[cfg(test)]
    pub(crate) fn snapshot_as_is(&self) -> PoolSnapshot {
        self.snapshot_of(&self.registry.lock())
    }

    fn snapshot_of(&self, reg: &Registry) -> PoolSnapshot {
        let endpoints: Vec<EndpointSnapshot> = reg
            .endpoints
            .values()
            .map(|e| EndpointSnapshot {
                addr: e.addr.clone(),
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

/// The registry at scale, with fake slots: the worker's and the slots' calls made by hand.
#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::broadcast::error::RecvError;
    use tokio::sync::watch;

    use super::Shared;
    use crate::config::Config;
    use crate::conn::Control;
    use crate::endpoint::KeepAlive;
    use crate::state::{ConnectivityState::*, Scope, StateEvent};
    use crate::target::Target;

    /// A bound on every wait (the clock is paused: it passes only when nothing can progress).
    const WAIT: Duration = Duration::from_secs(600);

    /// An eager pool's registry, resolved, with `per_address` connection slots at each of
    /// `addresses` loopback addresses, all Connecting; returns it and the slots' ids.
    fn registry(addresses: u8, per_address: usize) -> (Arc<Shared>, Vec<u64>) {
        let target = Target::parse("dns:///localhost:50051").expect("target");
        let (mailbox, _) = crate::mailbox::mailbox();
        let shared = Shared::new(
            Config::default(),
            target,
            tokio::runtime::Handle::current(),
            crate::mailbox::WeakMailbox::new(&mailbox),
        );
        shared.request_connect();
        shared.set_no_endpoints_state(Connecting, "resolving");
        let mut ids = Vec::new();
        for a in 0..addresses {
            let addr =
                crate::EndpointAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1 + a], 50051)));
            let keepalive = Arc::new(KeepAlive::new(None));
            for _ in 0..per_address {
                let (control, _) = watch::channel(Control::Run);
                ids.push(shared.add_connection(addr.clone(), &keepalive, control).0);
            }
        }
        (shared, ids)
    }

    /// A receiver of `events()` that reads nothing while 3 000 connections over 4 endpoints
    /// start and close (6 000 connection transitions, more than the 4 096 buffered) still
    /// gets every pool and endpoint transition, in order with what it got of the rest, and
    /// learns exactly how many connection transitions it missed.
    #[tokio::test(start_paused = true)]
    async fn events_keep_every_pool_and_endpoint_transition_at_scale() {
        let (shared, ids) = registry(4, 750);
        let mut events = shared.subscribe_events();
        for &id in &ids {
            shared.transition(id, Ready, "connected", None);
        }
        shared.shut_down("close() called");
        for &id in &ids {
            shared.transition(id, Shutdown, "pool closed", None);
            shared.remove_connection(id);
        }
        drop(shared);
        let (mut scoped, mut connections, mut missed) = (Vec::new(), 0, 0);
        loop {
            match tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("closed")
            {
                Ok(StateEvent {
                    scope: Scope::Connection { .. },
                    ..
                }) => connections += 1,
                Ok(event) => scoped.push((event.scope, event.from, event.to)),
                Err(RecvError::Lagged(n)) => missed += n,
                Err(RecvError::Closed) => break,
            }
        }
        assert_eq!(
            connections + missed,
            6_000,
            "every connection transition counted"
        );
        assert!(
            missed > 0,
            "the connection transitions overflowed the buffer"
        );
        let endpoint = |a: u8| {
            Scope::Endpoint(crate::EndpointAddr::from(std::net::SocketAddr::from((
                [127, 0, 0, 1 + a],
                50051,
            ))))
        };
        let mut expected: Vec<_> = (0..4).map(|a| (endpoint(a), Connecting, Ready)).collect();
        expected.insert(1, (Scope::Pool, Connecting, Ready));
        expected.push((Scope::Pool, Ready, Shutdown));
        expected.extend((0..4).map(|a| (endpoint(a), Ready, Shutdown)));
        assert_eq!(scoped, expected);
    }

    /// `wait_until` over a pool of 2 000 connections that become Ready one per millisecond
    /// checks its condition a few hundred times, not once per change — and still sees the
    /// last one.
    #[tokio::test(start_paused = true)]
    async fn wait_until_checks_at_most_once_per_spacing() {
        let (shared, ids) = registry(4, 500);
        let changes = {
            let shared = shared.clone();
            tokio::spawn(async move {
                for id in ids {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    shared.transition(id, Ready, "connected", None);
                }
            })
        };
        let checks = AtomicUsize::new(0);
        let waited = shared.wait_until_snapshot(|snapshot| {
            checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            snapshot.ready_connections() == 2_000
        });
        assert!(tokio::time::timeout(WAIT, waited).await.expect("in time"));
        changes.await.expect("changes made");
        let checks = checks.into_inner();
        // 2 000 × 2.5 µs = 5 ms apart over 2 s of changes: about 400.
        assert!(checks <= 500, "{checks} checks for 2 000 changes");
    }

    /// `n` Ready connections for the slots `ids`, over one real HTTP/2 connection to an h2
    /// server on an in-memory pipe (the registry only needs them to be distinct and usable).
    async fn connections(shared: &Shared, ids: &[u64]) -> Vec<Arc<crate::conn::Connection>> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(server)
                .await
                .expect("server handshake");
            while server.accept().await.is_some() {}
        });
        let (io, watched) = crate::conn::frames::FrameWatch::new(
            Box::new(client) as crate::connector::BoxedIo,
            None,
        );
        let (send, connection) = h2::client::handshake(io).await.expect("client handshake");
        tokio::spawn(connection);
        ids.iter()
            .map(|&id| {
                let stats = Arc::new(crate::conn::ConnStats::new(
                    shared.in_flight.clone(),
                    shared.room.clone(),
                ));
                Arc::new(crate::conn::Connection::new(
                    id,
                    crate::EndpointAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], 50051))),
                    send.clone(),
                    stats,
                    watched.fate.clone(),
                    watched.limits.clone(),
                ))
            })
            .collect()
    }

    /// In a pool of more Ready connections than are published at once (300 > 32), the first
    /// Ready connection is published at once (calls wait for it), those up to 32 too, and
    /// the rest together in one deferred publication; a connection that leaves while calls
    /// could still pick it (the health Watch's NOT_SERVING) leaves the picker at once, one
    /// already out of use waits for the next publication — and no pick hands it out.
    #[tokio::test(start_paused = true)]
    async fn deferred_publication_batches_and_urgent_changes_do_not_wait() {
        let (shared, ids) = registry(1, 300);
        let ready = connections(&shared, &ids).await;
        let published = || shared.load_picker().1.len();
        let generation = shared.generation();
        for (&id, conn) in ids.iter().zip(&ready) {
            shared.transition(id, Ready, "connected", Some(conn.clone()));
            if id == ids[0] {
                assert_eq!(
                    published(),
                    1,
                    "the first Ready connection waits for nothing"
                );
            }
        }
        assert_eq!(published(), super::PUBLISH_AT_ONCE_UP_TO);
        assert_eq!(
            shared.generation() - generation,
            super::PUBLISH_AT_ONCE_UP_TO as u64,
            "one publication per change"
        );
        // The deferred publication wakes the pool's waiters (its version moves); the paused
        // clock advances to its timer while this test waits.
        let mut version = shared.subscribe_version();
        tokio::time::timeout(WAIT, async {
            while published() != 300 {
                version.changed().await.expect("the pool is alive");
            }
        })
        .await
        .expect("the deferred publication comes");
        assert_eq!(
            shared.generation() - generation,
            super::PUBLISH_AT_ONCE_UP_TO as u64 + 1,
            "the others in one publication"
        );

        // Still usable: out of the picker at once.
        shared.transition(ids[0], TransientFailure, "NOT_SERVING", None);
        assert_eq!(published(), 299);
        // Out of use already: stays until the next publication, but is never picked.
        ready[1].mark_closing();
        shared.transition(ids[1], Idle, "GOAWAY from server", None);
        assert_eq!(published(), 299);
        let cursor = AtomicUsize::new(0);
        for _ in 0..600 {
            let (picked, _) = shared
                .load_picker()
                .1
                .pick_reporting(&cursor)
                .map(|(c, f)| (c.id, f))
                .expect("a pick");
            assert_ne!(picked, ids[1]);
        }
        assert_eq!(shared.snapshot().ready_connections(), 298);
        assert_eq!(published(), 298, "a snapshot makes the pending publication");
    }
}
