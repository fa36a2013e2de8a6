//! The settings a pool runs with, validated by [`PoolBuilder::build`](crate::PoolBuilder::build).
//! A leaf: every layer may read it, it reads nothing of theirs.

use crate::addr::EndpointAddr;
use std::collections::HashMap;
use std::time::Duration;

use http::{HeaderValue, Uri};

use crate::backoff::BackoffConfig;
use crate::balance::Balance;
use crate::connector::TcpSettings;
use crate::subset::Subsetting;

/// The largest connection count accepted for one endpoint.
pub(crate) const MAX_CONNECTIONS_PER_ENDPOINT: usize = 1024;

/// The `SETTINGS_MAX_HEADER_LIST_SIZE` a pool announces unless told otherwise: hyper's (and
/// so a tonic `Channel`'s), 16 KiB.
pub(crate) const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// The range RFC 9113 §6.5.2 allows for `SETTINGS_MAX_FRAME_SIZE`.
pub(crate) const MAX_FRAME_SIZE_RANGE: std::ops::RangeInclusive<u32> = 16_384..=16_777_215;

/// The validated settings a pool runs with.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) connections_per_endpoint: usize,
    pub(crate) connections_override: HashMap<EndpointAddr, usize>,
    pub(crate) max_connections_per_endpoint: Option<usize>,
    pub(crate) grown_idle_timeout: Option<Duration>,
    pub(crate) backoff: BackoffConfig,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) timeout: Option<Duration>,
    /// Handed to the connector with every destination.
    pub(crate) tcp: TcpSettings,
    pub(crate) keep_alive_interval: Option<Duration>,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) keep_alive_while_idle: bool,
    pub(crate) initial_stream_window_size: Option<u32>,
    pub(crate) initial_connection_window_size: Option<u32>,
    /// BDP-driven window growth (see `conn/bdp.rs`).
    pub(crate) adaptive_window: bool,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` the pool announces.
    pub(crate) max_header_list_size: u32,
    /// `SETTINGS_MAX_FRAME_SIZE` the pool announces; `None` leaves h2's (and RFC 9113's)
    /// 16 KiB.
    pub(crate) max_frame_size: Option<u32>,
    /// Idle mode: how long without calls before the pool closes its connections.
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) origin: Option<Uri>,
    pub(crate) wait_for_ready: bool,
    pub(crate) close_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) connect_lazily: bool,
    pub(crate) resolve_ttl_floor: Duration,
    pub(crate) resolve_ttl_ceiling: Duration,
    pub(crate) min_reresolve_interval: Duration,
    /// The service whose health each connection's server is asked for (gRFC A17); `None`:
    /// no health checking.
    #[cfg(feature = "health")]
    pub(crate) health_check: Option<String>,
    pub(crate) balance: Balance,
    /// Outlier detection (gRFC A50); `None`: off.
    pub(crate) outlier_detection: Option<crate::outlier::OutlierDetection>,
    /// Which of the resolved addresses to connect to; `None`: all of them.
    pub(crate) subset: Option<Subsetting>,
    /// The first stream id of every connection (unit tests only: ids running out).
    #[cfg(test)]
    pub(crate) initial_stream_id: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            connections_per_endpoint: 1,
            connections_override: HashMap::new(),
            max_connections_per_endpoint: None,
            grown_idle_timeout: Some(Duration::from_secs(60)),
            backoff: BackoffConfig::default(),
            connect_timeout: None,
            timeout: None,
            tcp: TcpSettings::default(),
            keep_alive_interval: None,
            keep_alive_timeout: Duration::from_secs(20),
            keep_alive_while_idle: false,
            initial_stream_window_size: None,
            initial_connection_window_size: None,
            adaptive_window: false,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            max_frame_size: None,
            idle_timeout: None,
            user_agent: None,
            origin: None,
            wait_for_ready: false,
            close_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            connect_lazily: false,
            resolve_ttl_floor: Duration::from_secs(5),
            resolve_ttl_ceiling: Duration::from_secs(30),
            min_reresolve_interval: Duration::from_secs(5),
            #[cfg(feature = "health")]
            health_check: None,
            balance: Balance::RoundRobin,
            outlier_detection: None,
            subset: None,
            #[cfg(test)]
            initial_stream_id: None,
        }
    }
}

impl Config {
    /// How many connections `addr` may grow to when all of its connections are full.
    pub(crate) fn max_connections_for(&self, addr: &EndpointAddr) -> usize {
        self.max_connections_per_endpoint
            .unwrap_or(0)
            .max(self.connections_for(addr))
    }

    /// Whether `addr` may open connections beyond its own count when they are all full.
    pub(crate) fn may_grow(&self, addr: &EndpointAddr) -> bool {
        self.max_connections_for(addr) > self.connections_for(addr)
    }

    /// How many connections `addr` gets.
    pub(crate) fn connections_for(&self, addr: &EndpointAddr) -> usize {
        self.connections_override
            .get(addr)
            .copied()
            .unwrap_or(self.connections_per_endpoint)
    }
}
