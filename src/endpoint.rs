//! One resolved address and everything the pool keeps about it: its connections' states,
//! whether it is draining (out of the address set, calls finishing), and the keepalive
//! interval its connections share.
//!
//! The registry keeps the endpoints (it is their one owner, under its lock); the worker
//! decides what to add and remove; slots report their connection's states.
//!
//! An endpoint counts its connections per state ([`StateCounts`], kept by the registry on
//! every change), so that its aggregate state costs O(1) however many connections it has;
//! its connections stay in the order of their ids (ids only grow and removal keeps the
//! order), so that one is found by a binary search.

use crate::addr::EndpointAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::conn::{ConnStats, Connection, Control};
use crate::growth;
use crate::outlier::AddressOutliers;
use crate::state::{ConnectivityState, Counters, StateCounts};

/// One address of the pool, as the registry keeps it.
#[derive(Debug)]
pub(crate) struct EndpointEntry {
    pub(crate) addr: EndpointAddr,
    pub(crate) draining: bool,
    pub(crate) state: ConnectivityState,
    /// Its connections, in the order of their ids.
    pub(crate) conns: Vec<ConnEntry>,
    /// Its connections by the state they count as ([`ConnEntry::effective`]).
    pub(crate) counts: StateCounts,
    pub(crate) keepalive: Arc<KeepAlive>,
    /// When it entered its current state.
    pub(crate) state_since: Instant,
    /// The counters of the connection slots it no longer has.
    pub(crate) removed: Counters,
    /// Outlier detection's state of it (ejected or not, and since when).
    pub(crate) outliers: AddressOutliers,
}

/// One connection slot of an endpoint, as the registry keeps it.
#[derive(Debug)]
pub(crate) struct ConnEntry {
    pub(crate) id: u64,
    pub(crate) state: ConnectivityState,
    /// Failed since it was last Ready: counts as TransientFailure in aggregates.
    pub(crate) failed: bool,
    pub(crate) ready: Option<Arc<Connection>>,
    /// Whether `ready` is an entry of the published picker (see the registry's publication).
    pub(crate) published: bool,
    pub(crate) stats: Arc<ConnStats>,
    pub(crate) last_error: Option<String>,
    /// What the worker asks of the slot's task (run, drain, shut down).
    pub(crate) control: watch::Sender<Control>,
    /// When it entered its current state.
    pub(crate) state_since: Instant,
}

impl ConnEntry {
    /// The state it counts as in aggregates: a connection that failed counts as
    /// TransientFailure until it is Ready again, so that its reconnects do not flap the
    /// aggregate back to Connecting.
    pub(crate) fn effective(&self) -> ConnectivityState {
        match self.state {
            ConnectivityState::Ready | ConnectivityState::Shutdown => self.state,
            _ if self.failed => ConnectivityState::TransientFailure,
            s => s,
        }
    }
}

impl EndpointEntry {
    /// Its aggregate state, from its counts: O(1).
    pub(crate) fn aggregate(&self) -> ConnectivityState {
        self.counts.aggregate()
    }

    /// Where the connection `id` is in [`conns`](Self::conns): O(log n).
    pub(crate) fn position(&self, id: u64) -> Option<usize> {
        self.conns.binary_search_by_key(&id, |c| c.id).ok()
    }

    /// Its counters: its connection slots', those it no longer has included.
    pub(crate) fn counters(&self) -> Counters {
        let mut counters = self.removed.clone();
        for conn in &self.conns {
            counters.add(&conn.stats.counters());
        }
        counters
    }
}

impl EndpointEntry {
    /// Whether another Ready connection is coming for this endpoint (see [`growth::room_coming`]).
    pub(crate) fn room_coming(&self, max: usize) -> bool {
        growth::room_coming(self.conns.iter().map(|c| (c.state, c.failed)), max)
    }

    /// Whether every connection is Ready (no connect under way).
    pub(crate) fn settled(&self) -> bool {
        self.conns
            .iter()
            .all(|c| c.state == ConnectivityState::Ready)
    }
}

/// The HTTP/2 keepalive interval shared by the connections of one endpoint.
///
/// gRFC A8: a server that finds our PINGs too frequent answers with GOAWAY
/// `ENHANCE_YOUR_CALM` / `too_many_pings`; the client must then double its interval (for that
/// endpoint's new connections) instead of being disconnected again and again.
#[derive(Debug)]
pub(crate) struct KeepAlive {
    /// The interval in milliseconds; 0 when keepalive is off.
    millis: AtomicU64,
}

impl KeepAlive {
    pub(crate) fn new(interval: Option<Duration>) -> Self {
        let millis = interval.map_or(0, |d| (d.as_millis() as u64).max(1));
        Self {
            millis: AtomicU64::new(millis),
        }
    }

    pub(crate) fn interval(&self) -> Option<Duration> {
        match self.millis.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Doubles the interval (if keepalive is on); returns the new one.
    pub(crate) fn double(&self) -> Option<Duration> {
        let doubled = self
            .millis
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ms| {
                (ms != 0).then(|| ms.saturating_mul(2))
            });
        doubled
            .ok()
            .map(|ms| Duration::from_millis(ms.saturating_mul(2)))
    }
}
