//! Metrics, with the `metrics` feature: gRPC's own names, emitted through the [`metrics`]
//! facade to whatever recorder the application installed (Prometheus with
//! `metrics-exporter-prometheus`, StatsD, an OpenTelemetry bridge, …).
//!
//! Every emission lives here, and each is called from the place that already counts the same
//! thing for [`Pool::snapshot`](crate::Pool::snapshot) (the connection slot's counters, the
//! in-flight guard, the registry): the snapshot and the metrics cannot disagree. Without the
//! feature this module is not compiled and none of its calls exist.
//!
//! | metric | kind, unit | labels | from |
//! |---|---|---|---|
//! | `grpc.client.attempt.started` | counter, `{attempt}` | `grpc.method`, `grpc.target` | gRFC A66 |
//! | `grpc.client.attempt.duration` | histogram, `s` | `grpc.method`, `grpc.target`, `grpc.status` | A66 |
//! | `grpc.client.attempt.sent_total_compressed_message_size` | histogram, `By` | same | A66 |
//! | `grpc.client.attempt.rcvd_total_compressed_message_size` | histogram, `By` | same | A66 |
//! | `grpc.client.call.duration` | histogram, `s` | same | A66 |
//! | `grpc.subchannel.connection_attempts_succeeded` | counter, `{attempt}` | `grpc.target` | A78 → A94 |
//! | `grpc.subchannel.connection_attempts_failed` | counter, `{attempt}` | `grpc.target` | A78 → A94 |
//! | `grpc.subchannel.disconnections` | counter, `{disconnection}` | `grpc.target`, `grpc.disconnect_error` | A78 → A94 |
//! | `grpc.subchannel.open_connections` | up-down gauge, `{connection}` | `grpc.target` | A94 |
//! | `grpc.lb.rr.endpoints` | gauge, `{endpoint}` | `grpc.target` | the pool (gRPC style) |
//! | `grpc.lb.rr.endpoints.ready` | gauge, `{endpoint}` | `grpc.target` | the pool (gRPC style) |
//! | `grpc.resolver.resolutions` | counter, `{resolution}` | `grpc.target`, `grpc.resolver.result` (`ok`, `error`) | the pool (gRPC style) |
//! | `grpc.resolver.addresses` | gauge, `{address}` | `grpc.target` | the pool (gRPC style) |
//! | `tonic_pool.transparent_retries` | counter, `{attempt}` | `grpc.target`, `reason` (`unsent`, `goaway`, `refused`, `not_opened`) | the pool |
//! | `tonic_pool.connections.grown` | counter, `{connection}` | `grpc.target` | the pool |
//! | `tonic_pool.connections.retired` | counter, `{connection}` | `grpc.target` | the pool |
//! | `tonic_pool.drains` | counter, `{endpoint}` | `grpc.target` | the pool |
//! | `tonic_pool.calls.waiting` | up-down gauge, `{call}` | `grpc.target` | the pool |
//! | `tonic_pool.outlier.ejections` | counter, `{endpoint}` | `grpc.target`, `reason` (`success_rate`, `failure_percentage`) | the pool (gRFC A50 names none) |
//! | `tonic_pool.outlier.ejected` | gauge, `{endpoint}` | `grpc.target` | the pool |
//!
//! The subchannel metrics were A78's `grpc.lb.pick_first.*`; gRFC A94 moved them to
//! `grpc.subchannel.*` and added `grpc.disconnect_error` (`GOAWAY NO_ERROR`, `connection
//! reset`, `connection timed out` for keepalive, `subchannel shutdown` for a drained, retired
//! or closed connection). A connection slot here is gRPC's subchannel. No gRFC names
//! round-robin or resolver metrics; those above follow gRPC's style.
//!
//! `grpc.method` is the path without its leading `/` (`echo.Echo/Unary`). gRFC A66 asks that
//! methods not known in advance be recorded as `other`: a pool cannot tell generated methods
//! from others, so it records the first 100 paths it sees and `other` after them.
//! Message sizes count the gRPC messages' bytes without their 5-byte prefixes.
//!
//! `grpc.target` is the canonical target, as gRPC writes it ([`Target::canonical`]):
//! `dns:///svc:50051` for a pool built for `svc:50051`.
//!
//! `grpc.disconnect_error` follows gRFC A94: the first reason seen — a GOAWAY received names
//! its code even if the socket then fails — else what broke the connection: `connection
//! reset` (the peer's RST), `connection aborted`, `connection timed out` (a keepalive PING
//! unanswered, or the socket's timeout), `socket error` (other socket errors, and a peer that
//! closed the socket without a GOAWAY), `unknown` (HTTP/2 closed it on the peer's protocol
//! error); `subchannel shutdown` when the pool closed it (drained, retired, closed).
//!
//! ## Cost
//!
//! Per call, the pool itself allocates nothing, takes no lock another thread takes, and
//! writes no memory another thread reads call by call: the call finds its method by the
//! address of its path, which the pool handle compares with its last call's (a generated
//! client's paths are static: see `MethodCache`), else in a table of write-once slots (a
//! hash of the path, an acquire load, a string comparison), and carries a 2-byte id; the
//! attempt's start and the call's are the clock read the pick already makes (the call's
//! taken at its future's first poll, so that the request is still built in place); the
//! request's message bytes are counted by the attempt's body cursor as frames go out (no
//! wrapper body), the response's as the body is read; at the attempt's end one more clock
//! read. The attempt's start and end go to its thread's shard (module `batch`:
//! a shard no other thread uses). A start is an atomic add to its method's counter there,
//! without a lock; the counters reach the recorder with the shard's next full batch of ends
//! of their method, or at the next flush of all the shards: one counter increment per method
//! and shard each time, not per call. An end is a 48-byte sample in the shard's batch,
//! under a short lock nobody else wants, and the batch reaches the recorder 64 ends at a
//! time: four histogram samples per call (three for an attempt that is retried), on the
//! handles registered once per method and status. The state a call carries for its metrics
//! is kept small (a method id, its start, two byte counts: 48 bytes of the in-flight guard),
//! because tonic moves a response body, which holds the guard, several times per call.
//! What the samples cost is the recorder's (see [below](#choosing-a-prometheus-recorder));
//! a recorder's handles are shared by the threads that record, and the batches keep their
//! cache lines on one core for a run at a time instead of trading them call by call. The
//! price is a delay: ends reach the recorder when their thread's batch fills, and ends and
//! starts when the process's flusher thread comes (module `flusher`: within a second of the
//! first sample or count left behind; a thread, not a timer in the application's runtime),
//! at [`Pool::snapshot`](crate::Pool::snapshot) and at the pool's close — never later than a
//! second, and never lost. (A full batch of ends takes the starts of its methods counted in
//! its shard, so a recorder mostly holds an attempt's start before its end; a start counted
//! in another shard than its end — its call moved threads — may trail the end by up to a
//! second. A snapshot flushes both.) The handles a sample or count goes to are registered
//! by the thread that records it, so a thread-local recorder gets its samples whichever
//! thread flushes them.
//! Connection and resolution metrics are registered when they happen (rare), straight to
//! the recorder. Install the recorder before building the pool: handles registered before
//! that go nowhere.
//!
//! ## Histogram buckets
//!
//! A recorder that keeps histograms in buckets needs their bounds: gRFC A66 gives the ones
//! gRPC's own default views use, here as [`LATENCY_BUCKETS`] (seconds, for the `duration`
//! histograms) and [`SIZE_BUCKETS`] (bytes, for the `message_size` ones). With
//! `metrics-exporter-prometheus`:
//!
//! ```
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//! use tonic_pool::metrics::{LATENCY_BUCKETS, SIZE_BUCKETS};
//!
//! let recorder = PrometheusBuilder::new()
//!     .set_buckets_for_metric(Matcher::Suffix("duration".into()), LATENCY_BUCKETS)?
//!     .set_buckets_for_metric(Matcher::Suffix("message_size".into()), SIZE_BUCKETS)?
//!     .build_recorder(); // or `.install()?`, which also serves `/metrics`
//! # drop(recorder);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Prometheus histograms, unlike its summaries, add up across the processes of a service.
//!
//! ## Choosing a Prometheus recorder
//!
//! Two recorders take the `metrics` facade's metrics to Prometheus, and with the pool's four
//! histogram samples per call they cost very differently (S2 of the load bench: client CPU
//! per call against a build without the feature, and its instructions per call;
//! `benches/RESULTS.md` sections 26–30):
//! - **`metrics-prometheus`**, over the `prometheus` crate, counts a sample into its bucket
//!   where it is recorded: a few atomic adds, no clock read, nothing stored to drain later.
//!   Its own share is small (+0.9 % in instructions over the feature without a recorder):
//!   the feature costs **+1.8 %** in CPU with two client threads (two runs pooled; +0.6 %
//!   with one codegen unit; +5.3 % with one client thread) and +2.15 % in instructions
//!   with one codegen unit (+3.1 % in the profile's 16 units, whose split of h2's code
//!   moves by ±0.6 % from build to build).
//! - **`metrics-exporter-prometheus`** stores each sample with a clock read and drains it into
//!   its histogram or summary at its upkeep: **+5.4 %** in instructions (+5.5 to +7.7 % CPU
//!   before the pool's own share was cut), more than half of it the exporter's.
//!
//! The `prometheus` crate takes no dots in names: wrap its recorder in [`Underscored`] (without
//! it, `metrics-prometheus` panics in debug builds and records none of these metrics in
//! release builds). It also fixes a histogram's buckets when it is made, so register the four
//! per-call histograms in A66's buckets before the pool records:
//!
//! ```
//! use tonic_pool::metrics::{Underscored, LATENCY_BUCKETS, SIZE_BUCKETS};
//!
//! // Into `prometheus::default_registry()`; `.with_registry(r)` for another.
//! let recorder = metrics_prometheus::Recorder::builder().build();
//! for (name, buckets) in [
//!     ("grpc_client_attempt_duration", LATENCY_BUCKETS),
//!     ("grpc_client_call_duration", LATENCY_BUCKETS),
//!     ("grpc_client_attempt_sent_total_compressed_message_size", SIZE_BUCKETS),
//!     ("grpc_client_attempt_rcvd_total_compressed_message_size", SIZE_BUCKETS),
//! ] {
//!     let labels = ["grpc_method", "grpc_target", "grpc_status"];
//!     let opts = prometheus::HistogramOpts::new(name, name).buckets(buckets.to_vec());
//!     recorder.try_register_metric(prometheus::HistogramVec::new(opts, &labels)?)?;
//! }
//! metrics::set_global_recorder(Underscored::new(recorder))?;
//! // Serve `prometheus::TextEncoder::new().encode_to_string(&prometheus::gather())`.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use ::metrics::{Counter, Gauge, Histogram, Label, SharedString, Unit};
use tonic::Code;

use self::batch::{Batches, Counts};

use crate::state::{Disconnect, Outcome, Retry};
use crate::target::Target;

mod batch;
mod flusher;
mod underscored;

pub use self::underscored::Underscored;

/// How many distinct `grpc.method` values a pool records before it records `other`.
pub(crate) const MAX_METHODS: usize = 100;

/// gRFC A66's bucket bounds for latency histograms, in seconds: `grpc.client.attempt.duration`
/// and `grpc.client.call.duration` (see [the module docs](self#histogram-buckets)).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005,
    0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16,
    0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
];

/// gRFC A66's bucket bounds for size histograms, in bytes: the attempts'
/// `sent_total_compressed_message_size` and `rcvd_total_compressed_message_size`.
pub const SIZE_BUCKETS: &[f64] = &[
    0.0,
    1024.0,
    2048.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];

const ATTEMPT_STARTED: &str = "grpc.client.attempt.started";
const ATTEMPT_DURATION: &str = "grpc.client.attempt.duration";
const ATTEMPT_SENT: &str = "grpc.client.attempt.sent_total_compressed_message_size";
const ATTEMPT_RCVD: &str = "grpc.client.attempt.rcvd_total_compressed_message_size";
const CALL_DURATION: &str = "grpc.client.call.duration";
const CONNECT_SUCCEEDED: &str = "grpc.subchannel.connection_attempts_succeeded";
const CONNECT_FAILED: &str = "grpc.subchannel.connection_attempts_failed";
const DISCONNECTIONS: &str = "grpc.subchannel.disconnections";
const OPEN_CONNECTIONS: &str = "grpc.subchannel.open_connections";
const RR_ENDPOINTS: &str = "grpc.lb.rr.endpoints";
const RR_ENDPOINTS_READY: &str = "grpc.lb.rr.endpoints.ready";
const RESOLUTIONS: &str = "grpc.resolver.resolutions";
const RESOLVED_ADDRESSES: &str = "grpc.resolver.addresses";
const RETRIES: &str = "tonic_pool.transparent_retries";
const GROWN: &str = "tonic_pool.connections.grown";
const RETIRED: &str = "tonic_pool.connections.retired";
const DRAINS: &str = "tonic_pool.drains";
const WAITING: &str = "tonic_pool.calls.waiting";
const OUTLIER_EJECTIONS: &str = "tonic_pool.outlier.ejections";
const OUTLIER_EJECTED: &str = "tonic_pool.outlier.ejected";

const TARGET: &str = "grpc.target";
const METHOD: &str = "grpc.method";
const STATUS: &str = "grpc.status";

/// gRPC's names of its status codes, by code.
const STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The metrics of one pool: its `grpc.target` label and the handles it keeps.
#[derive(Debug)]
pub(crate) struct PoolMetrics {
    target: SharedString,
    methods: MethodTable,
    /// The per-call samples on their way to the recorder (see [`batch`]).
    samples: Batches<Ended>,
    /// Itself, for the [`flusher`] to come back to.
    me: Weak<PoolMetrics>,
    open_connections: Gauge,
    waiting: Gauge,
    endpoints: Gauge,
    endpoints_ready: Gauge,
}

impl PoolMetrics {
    /// The metrics of the pool of `target` (as written, or already canonical): its
    /// `grpc.target` is the canonical form (see [`canonical_target`]).
    pub(crate) fn new(target: &str) -> Arc<Self> {
        describe();
        let target = SharedString::from(Arc::<str>::from(canonical_target(target)));
        let labels = vec![Label::new(TARGET, target.clone())];
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            open_connections: ::metrics::gauge!(OPEN_CONNECTIONS, labels.clone()),
            waiting: ::metrics::gauge!(WAITING, labels.clone()),
            endpoints: ::metrics::gauge!(RR_ENDPOINTS, labels.clone()),
            endpoints_ready: ::metrics::gauge!(RR_ENDPOINTS_READY, labels),
            target,
            methods: MethodTable::new(),
            samples: Batches::new(METHOD_COUNTERS),
        })
    }

    /// Hands an attempt's end to the recorder, in its thread's next batch; the first sample
    /// left behind since the last flush asks the [`flusher`] to come within a second.
    #[inline]
    fn record(&self, ended: Ended) {
        if self
            .samples
            .push(ended, |run, counts| self.record_now(run, counts))
        {
            flusher::ask(self.me.clone());
        }
    }

    /// Counts an attempt of `method` started, in its thread's shard (an atomic add, no lock),
    /// for the next flush of all the batches.
    #[inline]
    fn started(&self, method: MethodId) {
        if self.samples.count(method.counter()) {
            flusher::ask(self.me.clone());
        }
    }

    /// Records a batch of ends into the recorder's handles by stretches of one method and
    /// status (a batch is mostly one stretch), each stretch's handles looked up once and its
    /// four histograms taken one at a time: a recorder's bucket then takes the samples back
    /// to back, its cache line on this core, instead of four buckets in turn. Each stretch's
    /// method first takes its starts counted in the batch's shard, so that a recorder mostly
    /// holds an attempt's start before its end.
    fn record_now(&self, batch: &[Ended], counts: Counts<'_>) {
        let mut rest = batch;
        while let Some(first) = rest.first() {
            let len = rest
                .iter()
                .position(|e| e.method != first.method || e.code != first.code)
                .unwrap_or(rest.len());
            let (stretch, tail) = rest.split_at(len);
            rest = tail;
            let method = self.method_metrics(first.method);
            match counts.take(first.method.counter()) {
                0 => {}
                started => method.started.increment(started),
            }
            let status = method.status(first.code);
            for ended in stretch {
                status.attempt_duration.record(seconds(ended.attempt_ns));
            }
            for ended in stretch {
                status.sent.record(ended.sent as f64);
            }
            for ended in stretch {
                status.rcvd.record(ended.rcvd as f64);
            }
            for ended in stretch {
                if let Some(call_ns) = ended.call_ns {
                    status.call_duration.record(seconds(call_ns));
                }
            }
        }
    }

    /// Sends every end still in a batch, and the starts counted, to the recorder: at a
    /// snapshot, when the [`flusher`] comes for them, at the pool's close and end.
    pub(crate) fn flush(&self) {
        self.samples.flush_all(
            |run, counts| self.record_now(run, counts),
            |counter, n| {
                self.method_metrics(MethodId::of_counter(counter))
                    .started
                    .increment(n);
            },
        );
    }

    fn labels(&self) -> Vec<Label> {
        vec![Label::new(TARGET, self.target.clone())]
    }

    fn with(&self, key: &'static str, value: impl Into<SharedString>) -> Vec<Label> {
        vec![
            Label::new(TARGET, self.target.clone()),
            Label::new(key, value.into()),
        ]
    }

    /// The method at `path` (a request's URI path), registered the first time it is seen.
    #[inline]
    pub(crate) fn method(&self, path: &str) -> MethodId {
        self.methods.find(&self.target, path)
    }

    /// The method of a request to `uri`, through a pool handle's `cache` (see
    /// [`MethodCache`]).
    #[inline]
    pub(crate) fn method_of(&self, cache: &mut MethodCache, uri: &http::Uri) -> MethodId {
        match (&cache.last, uri.path_and_query()) {
            (Some((seen, id)), Some(path)) if same_bytes(seen.as_str(), path.as_str()) => *id,
            _ => self.method_to_cache(cache, uri),
        }
    }

    #[cold]
    #[inline(never)]
    fn method_to_cache(&self, cache: &mut MethodCache, uri: &http::Uri) -> MethodId {
        let path = uri.path();
        if let Some((seen, id)) = &cache.last {
            if seen.path() == path {
                // The same path built anew for this request (a client whose origin has a
                // path of its own formats every path): the kept one stays, nothing is cloned.
                return *id;
            }
        }
        let id = self.method(path);
        cache.last = uri.path_and_query().map(|path| (path.clone(), id));
        id
    }

    fn method_metrics(&self, id: MethodId) -> &MethodMetrics {
        self.methods.get(&self.target, id)
    }

    /// A connection attempt succeeded: the connection is open.
    pub(crate) fn connected(&self) {
        ::metrics::counter!(CONNECT_SUCCEEDED, self.labels()).increment(1);
        self.open_connections.increment(1.0);
    }

    pub(crate) fn connect_failed(&self) {
        ::metrics::counter!(CONNECT_FAILED, self.labels()).increment(1);
    }

    /// An open connection stopped serving, for `reason`; `lost_error` is the
    /// `grpc.disconnect_error` of a connection lost without a GOAWAY ([`Disconnect::Reset`]),
    /// which the connection tells apart (`connection reset`, `socket error`, …).
    pub(crate) fn disconnected(&self, reason: Disconnect, lost_error: &'static str) {
        let error: SharedString = match reason {
            Disconnect::GoAway(code) => match h2_code_name(code) {
                Some(name) => format!("GOAWAY {name}").into(),
                None => format!("GOAWAY {code:#x}").into(),
            },
            Disconnect::Reset => lost_error.into(),
            Disconnect::KeepAliveTimeout => "connection timed out".into(),
            Disconnect::Drained | Disconnect::Retired | Disconnect::Shutdown => {
                "subchannel shutdown".into()
            }
        };
        ::metrics::counter!(DISCONNECTIONS, self.with("grpc.disconnect_error", error)).increment(1);
        self.open_connections.decrement(1.0);
        if reason == Disconnect::Retired {
            ::metrics::counter!(RETIRED, self.labels()).increment(1);
        }
    }

    /// Growth opened another connection to an endpoint whose connections were all full.
    pub(crate) fn grown(&self) {
        ::metrics::counter!(GROWN, self.labels()).increment(1);
    }

    /// An endpoint left the address set and drains.
    pub(crate) fn drain(&self) {
        ::metrics::counter!(DRAINS, self.labels()).increment(1);
    }

    /// Outlier detection ejected an endpoint.
    pub(crate) fn outlier_ejected(&self, reason: &'static str) {
        ::metrics::counter!(OUTLIER_EJECTIONS, self.with("reason", reason)).increment(1);
    }

    /// How many endpoints outlier detection holds ejected.
    pub(crate) fn outliers_ejected(&self, ejected: usize) {
        ::metrics::gauge!(OUTLIER_EJECTED, self.labels()).set(ejected as f64);
    }

    /// The endpoints in the address set, and how many of them are Ready.
    pub(crate) fn endpoints(&self, active: usize, ready: usize) {
        self.endpoints.set(active as f64);
        self.endpoints_ready.set(ready as f64);
    }

    /// A resolution answered `addresses`, or failed (`None`).
    pub(crate) fn resolved(&self, addresses: Option<usize>) {
        let result = if addresses.is_some() { "ok" } else { "error" };
        ::metrics::counter!(RESOLUTIONS, self.with("grpc.resolver.result", result)).increment(1);
        if let Some(n) = addresses {
            ::metrics::gauge!(RESOLVED_ADDRESSES, self.labels()).set(n as f64);
        }
    }

    /// A call that failed with no connection to count it, at `now`: its
    /// `grpc.client.call.duration`.
    pub(crate) fn call_failed_without_connection(&self, call: CallMetrics, now: u64, code: Code) {
        let elapsed = now.saturating_sub(call.started);
        self.method_metrics(call.method)
            .status(code)
            .call_duration
            .record(seconds(elapsed));
    }

    /// A call waits for a connection until the returned guard drops.
    pub(crate) fn waiting(&self) -> Waiting<'_> {
        self.waiting.increment(1.0);
        Waiting(&self.waiting)
    }
}

/// The name of an HTTP/2 error code (RFC 9113 section 7), e.g. `ENHANCE_YOUR_CALM`.
fn h2_code_name(code: u32) -> Option<&'static str> {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    NAMES.get(code as usize).copied()
}

/// gRFC A66's `grpc.target`: the canonical target string ([`Target::canonical`]:
/// `dns:///svc:50051` for `svc:50051`). A target of a resolver's own scheme, which
/// [`Target::parse`] does not know, is canonical as written. Canonical targets stay as they
/// are, so the pool may hand over either form.
fn canonical_target(target: &str) -> String {
    match Target::parse(target) {
        Ok(parsed) => parsed.canonical(),
        Err(_) => target.trim().to_owned(),
    }
}

/// Counts a call in `tonic_pool.calls.waiting` while it lives.
#[derive(Debug)]
pub(crate) struct Waiting<'a>(&'a Gauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// How many slots the method table has: a power of two, well above [`MAX_METHODS`], so that
/// probes stay short.
const METHOD_SLOTS: usize = 256;

/// A method's place in its pool's [`MethodTable`]: what a call carries instead of a handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MethodId(u16);

impl MethodId {
    /// The methods past [`MAX_METHODS`], recorded as `other`.
    const OTHER: Self = Self(u16::MAX);
    /// No method yet: an attempt whose call has not named it (never sent). Not a slot (the
    /// table has [`METHOD_SLOTS`]), so never a method's id.
    pub(crate) const NONE: Self = Self(u16::MAX - 1);

    /// Its counter of started attempts in a shard (see [`METHOD_COUNTERS`]): its slot, or
    /// the last counter for `other`.
    #[inline]
    fn counter(self) -> usize {
        usize::from(self.0).min(METHOD_SLOTS)
    }

    /// The method whose counter is `counter`.
    fn of_counter(counter: usize) -> Self {
        match u16::try_from(counter) {
            Ok(slot) if counter < METHOD_SLOTS => Self(slot),
            _ => Self::OTHER,
        }
    }
}

/// A shard's counters of started attempts: one per method slot and one for `other` (2 KB,
/// allocated for the shards of the threads that make calls).
const METHOD_COUNTERS: usize = METHOD_SLOTS + 1;

/// The per-call handles of the methods a pool has seen, found without a lock: an
/// open-addressing table of slots that are written once (`OnceLock`), so that finding a known
/// method is a hash of its name, an acquire load and a string comparison — no lock, no
/// reference count, no allocation, nothing written that another thread reads.
#[derive(Debug)]
struct MethodTable {
    slots: Box<[OnceLock<Box<MethodMetrics>>]>,
    /// Slots taken (or being taken), at most [`MAX_METHODS`].
    taken: AtomicUsize,
    other: OnceLock<MethodMetrics>,
}

impl MethodTable {
    fn new() -> Self {
        Self {
            slots: (0..METHOD_SLOTS).map(|_| OnceLock::new()).collect(),
            taken: AtomicUsize::new(0),
            other: OnceLock::new(),
        }
    }

    fn find(&self, target: &SharedString, path: &str) -> MethodId {
        let name = path.strip_prefix('/').unwrap_or(path);
        let mut index = name_hash(name.as_bytes()) as usize % METHOD_SLOTS;
        for _ in 0..METHOD_SLOTS {
            let method = match self.slots[index].get() {
                Some(method) => method,
                None => match self.register(target, index, name) {
                    Some(method) => method,
                    None => return MethodId::OTHER,
                },
            };
            if *method.method == *name {
                return MethodId(index as u16);
            }
            index = (index + 1) % METHOD_SLOTS;
        }
        MethodId::OTHER
    }

    /// Fills the empty slot `index` with `name`, unless the table is full; another thread may
    /// fill it first (with the same name or another): the slot's method is returned either way.
    #[cold]
    fn register(&self, target: &SharedString, index: usize, name: &str) -> Option<&MethodMetrics> {
        if self.taken.fetch_add(1, Ordering::Relaxed) >= MAX_METHODS {
            self.taken.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let mut filled = false;
        let method = self.slots[index].get_or_init(|| {
            filled = true;
            Box::new(MethodMetrics::new(
                target,
                SharedString::from(name.to_owned()),
            ))
        });
        if !filled {
            self.taken.fetch_sub(1, Ordering::Relaxed);
        }
        Some(method)
    }

    fn get(&self, target: &SharedString, id: MethodId) -> &MethodMetrics {
        match self.slots.get(usize::from(id.0)).and_then(OnceLock::get) {
            Some(method) => method,
            None => self
                .other
                .get_or_init(|| MethodMetrics::new(target, "other".into())),
        }
    }
}

/// A method name's hash: its length and its first and last eight bytes (method paths of one
/// service share their start and differ at their end), mixed by two multiplications. A
/// collision only makes a probe longer: the table compares whole names.
#[inline]
fn name_hash(name: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let (head, tail) = match (name.first_chunk::<8>(), name.last_chunk::<8>()) {
        (Some(head), Some(tail)) => (u64::from_le_bytes(*head), u64::from_le_bytes(*tail)),
        // Shorter than eight bytes: all of it, both ways (no copy into a padded word, which
        // would be a `memcpy` call).
        _ => {
            let word = name
                .iter()
                .rev()
                .fold(0u64, |word, &byte| word << 8 | u64::from(byte));
            (word, word)
        }
    };
    let mixed = (head ^ (name.len() as u64)).wrapping_mul(K) ^ tail;
    mixed.wrapping_mul(K) >> 32
}

/// The per-call handles of one method, by status as statuses are seen.
#[derive(Debug)]
pub(crate) struct MethodMetrics {
    target: SharedString,
    method: SharedString,
    started: Counter,
    statuses: [OnceLock<StatusMetrics>; 17],
    retries: [OnceLock<Counter>; 4],
}

#[derive(Debug)]
struct StatusMetrics {
    attempt_duration: Histogram,
    sent: Histogram,
    rcvd: Histogram,
    call_duration: Histogram,
}

impl MethodMetrics {
    fn new(target: &SharedString, method: SharedString) -> Self {
        let labels = vec![
            Label::new(METHOD, method.clone()),
            Label::new(TARGET, target.clone()),
        ];
        Self {
            started: ::metrics::counter!(ATTEMPT_STARTED, labels),
            target: target.clone(),
            method,
            statuses: Default::default(),
            retries: Default::default(),
        }
    }

    #[inline]
    fn status(&self, code: Code) -> &StatusMetrics {
        let index = (code as usize).min(STATUS_NAMES.len() - 1);
        self.statuses[index].get_or_init(|| {
            let labels = vec![
                Label::new(METHOD, self.method.clone()),
                Label::new(TARGET, self.target.clone()),
                Label::new(STATUS, STATUS_NAMES[index]),
            ];
            StatusMetrics {
                attempt_duration: ::metrics::histogram!(ATTEMPT_DURATION, labels.clone()),
                sent: ::metrics::histogram!(ATTEMPT_SENT, labels.clone()),
                rcvd: ::metrics::histogram!(ATTEMPT_RCVD, labels.clone()),
                call_duration: ::metrics::histogram!(CALL_DURATION, labels),
            }
        })
    }

    fn retried(&self, reason: Retry) {
        // (One slot per `Retry` variant, in its order.)
        self.retries[reason as usize]
            .get_or_init(|| {
                let labels = vec![
                    Label::new(TARGET, self.target.clone()),
                    Label::new("reason", reason.label()),
                ];
                ::metrics::counter!(RETRIES, labels)
            })
            .increment(1);
    }
}

/// A pool handle's last method: its request path, kept (a clone of the path's bytes, which
/// keeps them where they are), and its id.
///
/// A generated client's paths are static strings (`PathAndQuery::from_static`), the same
/// bytes at the same address on every call, so the next call of the same method finds its id
/// by comparing two addresses and two lengths — no hash, no table, no string comparison. That
/// comparison is exact, not a guess: the bytes the cache holds cannot be freed or changed
/// while it holds them, so no other path can be at their address; same address and length
/// is the same path. A path at another address is compared with the last path's bytes (the
/// same path built per request keeps the cache as it is), else looked up in the pool's table
/// and becomes the handle's last. The cache keeps the last path's bytes alive (with a path
/// sliced from a larger buffer, that buffer) until the handle calls another method or drops.
#[derive(Clone, Debug, Default)]
pub(crate) struct MethodCache {
    last: Option<(http::uri::PathAndQuery, MethodId)>,
}

/// Whether `a` and `b` are the same bytes in memory (not merely equal bytes).
#[inline]
fn same_bytes(a: &str, b: &str) -> bool {
    std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len()
}

/// What a call's attempts need to know of the call: its method and when it started
/// (on the pool's clock, `crate::balance::now_ns`). Two words, copied into each attempt.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallMetrics {
    pub(crate) method: MethodId,
    pub(crate) started: u64,
}

/// Nanoseconds as the seconds a duration histogram records.
#[inline]
fn seconds(nanos: u64) -> f64 {
    nanos as f64 * 1e-9
}

/// One attempt's metrics, carried by its in-flight guard: its call (once the call names it)
/// and the bytes of the messages it sent and received. Its start is the guard's pick time.
///
/// 48 bytes, and it must stay small: the guard is part of the response body, which tonic
/// moves several times on every call — see the note on its size at `ResponseBody`.
#[derive(Debug)]
pub(crate) struct Attempt {
    /// The call's method, once the call names it ([`MethodId::NONE`]: never sent). A
    /// sentinel, not an `Option`, which would take 4 bytes and push the struct to 56.
    method: MethodId,
    /// The call's start (on the pool's clock), once the call names it.
    call_started: u64,
    sent: Sent,
    rcvd: MessageBytes,
}

impl Default for Attempt {
    fn default() -> Self {
        Self {
            method: MethodId::NONE,
            call_started: 0,
            sent: Sent::default(),
            rcvd: MessageBytes::default(),
        }
    }
}

/// The bytes of request messages an attempt sent.
#[derive(Debug)]
enum Sent {
    /// Known when the response started: the whole request had been sent (a unary call).
    Counted(u64),
    /// The request body still streams after the response started: its writer counts on.
    Streaming(Arc<AtomicU64>),
}

impl Default for Sent {
    fn default() -> Self {
        Self::Counted(0)
    }
}

impl Attempt {
    /// The call names its method and start: `grpc.client.attempt.started`.
    #[inline]
    pub(crate) fn of_call(&mut self, metrics: &PoolMetrics, call: CallMetrics) {
        metrics.started(call.method);
        self.method = call.method;
        self.call_started = call.started;
    }

    /// What the attempt sent, as its body cursor counted it. Once the response has started
    /// with the request still streaming, the cursor keeps counting into a shared cell (the
    /// only allocation of the metrics on a call, and only on such streaming calls).
    pub(crate) fn sent(&mut self, sent: &mut SentBytes, still_sending: bool) {
        self.sent = if still_sending {
            Sent::Streaming(sent.share())
        } else {
            Sent::Counted(sent.bytes.total)
        };
    }

    /// A data frame of the response arrived.
    #[inline]
    pub(crate) fn received(&mut self, data: &[u8]) {
        self.rcvd.feed(data);
    }

    /// The attempt, which picked its connection at `picked_at`, ended at `now` (both on the
    /// pool's clock, `crate::balance::now_ns`) with `outcome`: its duration and sizes, and
    /// the call's duration unless the call goes on with another attempt.
    pub(crate) fn ended(&self, metrics: &PoolMetrics, picked_at: u64, now: u64, outcome: Outcome) {
        let method = self.method;
        if method == MethodId::NONE {
            // Dropped before the call named it: never sent.
            return;
        }
        let code = match outcome {
            Outcome::Status(code) => code,
            Outcome::Retried(reason) => {
                // Rare: straight to the recorder.
                metrics.method_metrics(method).retried(reason);
                Code::Unavailable
            }
        };
        // The method's and status's handles exist before the sample is batched: registered
        // here, on the recording thread, with the recorder this thread sees (a thread-local
        // one included), not on whichever thread flushes. Once registered, a load.
        let _ = metrics.method_metrics(method).status(code);
        let sent = match &self.sent {
            Sent::Counted(n) => *n,
            Sent::Streaming(n) => n.load(Ordering::Relaxed),
        };
        metrics.record(Ended {
            method,
            code,
            attempt_ns: now.saturating_sub(picked_at),
            sent,
            rcvd: self.rcvd.total,
            call_ns: match outcome {
                Outcome::Status(_) => Some(now.saturating_sub(self.call_started)),
                Outcome::Retried(_) => None,
            },
        });
    }
}

/// An attempt's end, on its way to the recorder: its three histograms, and the call's
/// duration if the call ended with it (48 bytes).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ended {
    method: MethodId,
    code: Code,
    attempt_ns: u64,
    sent: u64,
    rcvd: u64,
    call_ns: Option<u64>,
}

impl Drop for PoolMetrics {
    /// The pool and its last call are gone: the samples still batched go to the recorder.
    fn drop(&mut self) {
        self.flush();
    }
}

/// A unary call's samples as a pool makes them, through its batches: for the criterion
/// benches (`--features bench-internals,metrics`), to weigh the batches against recording
/// straight into the recorder.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
#[derive(Debug)]
pub struct CallSamples {
    metrics: Arc<PoolMetrics>,
    method: MethodId,
}

#[cfg(feature = "bench-internals")]
impl CallSamples {
    /// A pool's metrics for `target`, with the method `/echo.Echo/Unary` registered (with
    /// the recorder current now).
    pub fn new(target: &str) -> Self {
        let metrics = PoolMetrics::new(target);
        let method = metrics.method("/echo.Echo/Unary");
        let samples = Self { metrics, method };
        // The status handles are registered at the first flush: now, with this recorder.
        samples.one_call(1_000);
        samples.flush();
        samples
    }

    /// One unary call that took `nanos`: its start, then its end with status OK.
    #[inline]
    pub fn one_call(&self, nanos: u64) {
        self.metrics.started(self.method);
        self.metrics.record(Ended {
            method: self.method,
            code: Code::Ok,
            attempt_ns: nanos,
            sent: 37,
            rcvd: 37,
            call_ns: Some(nanos),
        });
    }

    /// Sends what waits in the batches to the recorder.
    pub fn flush(&self) {
        self.metrics.flush();
    }
}

/// Counts the bytes of gRPC messages in a byte stream, without their 5-byte prefixes
/// (compressed flag, big-endian length). Sixteen bytes: the length being read is assembled
/// in `left` itself, which an in-flight guard carries for every call.
#[derive(Debug, Default)]
pub(crate) struct MessageBytes {
    total: u64,
    /// What is left of the message being read (a length prefix is 32 bits) — or, while a
    /// prefix is read (`prefix_len` 2 to 4), its length bytes so far.
    left: u32,
    /// Bytes of the 5-byte prefix read so far (0: none, or the message's bytes are read).
    prefix_len: u8,
}

impl MessageBytes {
    /// Counts the message bytes in `data`, the next bytes of the stream.
    #[inline]
    pub(crate) fn feed(&mut self, data: &[u8]) {
        // The usual frame: exactly one whole message, between two messages (a unary call's).
        if let (0, 0, Some((&[_, a, b, c, d], message))) =
            (self.prefix_len, self.left, data.split_first_chunk::<5>())
        {
            if message.len() as u64 == u64::from(u32::from_be_bytes([a, b, c, d])) {
                self.total += message.len() as u64;
                return;
            }
        }
        self.feed_any(data);
    }

    /// [`MessageBytes::feed`] for any split of the stream.
    fn feed_any(&mut self, mut data: &[u8]) {
        while let Some((&byte, rest)) = data.split_first() {
            if self.prefix_len == 0 && self.left > 0 {
                let n = data.len().min(self.left as usize);
                self.total += n as u64;
                self.left -= n as u32;
                data = &data[n..];
                continue;
            }
            // The prefix: a compressed flag (skipped), then the big-endian length — read at
            // once when the frame holds all of it (nearly always), else byte by byte.
            if self.prefix_len == 0 {
                if let Some((prefix, rest)) = data.split_first_chunk::<5>() {
                    let [_, length @ ..] = *prefix;
                    self.left = u32::from_be_bytes(length);
                    data = rest;
                    continue;
                }
            }
            if self.prefix_len > 0 {
                self.left = self.left << 8 | u32::from(byte);
            }
            self.prefix_len += 1;
            data = rest;
            if self.prefix_len == 5 {
                self.prefix_len = 0;
            }
        }
    }
}

/// The request message bytes one attempt sent, counted by its body cursor as frames go out
/// (replayed or new): no wrapper around the request body, nothing allocated.
#[derive(Debug, Default)]
pub(crate) struct SentBytes {
    bytes: MessageBytes,
    /// Where the count goes once the attempt's response started with its request still
    /// streaming (see [`Attempt::sent`]).
    shared: Option<Arc<AtomicU64>>,
}

impl SentBytes {
    /// A data frame of the request went to the attempt.
    #[inline]
    pub(crate) fn feed(&mut self, data: &[u8]) {
        self.bytes.feed(data);
        if let Some(shared) = &self.shared {
            shared.store(self.bytes.total, Ordering::Relaxed);
        }
    }

    fn share(&mut self) -> Arc<AtomicU64> {
        let total = self.bytes.total;
        self.shared
            .get_or_insert_with(|| Arc::new(AtomicU64::new(total)))
            .clone()
    }
}

/// Names the metrics' units and meanings for the recorder (at each pool's build: the
/// recorder then is the one its handles go to).
fn describe() {
    {
        use ::metrics::{describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            ATTEMPT_STARTED,
            Unit::Count,
            "RPC attempts started, including those that have not completed"
        );
        describe_histogram!(
            ATTEMPT_DURATION,
            Unit::Seconds,
            "End-to-end time of an RPC attempt, including the pick of a connection"
        );
        describe_histogram!(
            ATTEMPT_SENT,
            Unit::Bytes,
            "Bytes of the request messages of an attempt (compressed, no framing)"
        );
        describe_histogram!(
            ATTEMPT_RCVD,
            Unit::Bytes,
            "Bytes of the response messages of an attempt (compressed, no framing)"
        );
        describe_histogram!(
            CALL_DURATION,
            Unit::Seconds,
            "End-to-end time of an RPC as the application sees it"
        );
        describe_counter!(
            CONNECT_SUCCEEDED,
            Unit::Count,
            "Successful connection attempts"
        );
        describe_counter!(CONNECT_FAILED, Unit::Count, "Failed connection attempts");
        describe_counter!(
            DISCONNECTIONS,
            Unit::Count,
            "Times a connection stopped serving, by grpc.disconnect_error"
        );
        describe_gauge!(OPEN_CONNECTIONS, Unit::Count, "Open connections");
        describe_gauge!(
            RR_ENDPOINTS,
            Unit::Count,
            "Endpoints (resolved addresses) in the address set"
        );
        describe_gauge!(
            RR_ENDPOINTS_READY,
            Unit::Count,
            "Endpoints in the address set with a Ready connection"
        );
        describe_counter!(
            RESOLUTIONS,
            Unit::Count,
            "Resolutions of the target, by result"
        );
        describe_gauge!(
            RESOLVED_ADDRESSES,
            Unit::Count,
            "Addresses in the last good resolution"
        );
        describe_counter!(
            RETRIES,
            Unit::Count,
            "Attempts sent again on another connection, by reason"
        );
        describe_counter!(
            GROWN,
            Unit::Count,
            "Connections opened because every connection of an endpoint was full"
        );
        describe_counter!(
            RETIRED,
            Unit::Count,
            "Connections the pool retired (grown and idle, or out of stream ids)"
        );
        describe_counter!(
            DRAINS,
            Unit::Count,
            "Endpoints that left the address set and drained"
        );
        describe_gauge!(WAITING, Unit::Count, "Calls waiting for a Ready connection");
        describe_counter!(
            OUTLIER_EJECTIONS,
            Unit::Count,
            "Endpoints ejected by outlier detection, by reason"
        );
        describe_gauge!(
            OUTLIER_EJECTED,
            Unit::Count,
            "Endpoints outlier detection holds ejected"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{
        MessageBytes, MethodCache, MethodId, MethodTable, PoolMetrics, SharedString, MAX_METHODS,
    };

    /// The method table finds each method again under the id it was registered with, tells
    /// methods apart whatever their hashes (many names share their first and last eight
    /// bytes), and records the methods past [`MAX_METHODS`] as `other`.
    #[test]
    fn method_table_finds_methods_and_caps_them() {
        let table = MethodTable::new();
        let target = SharedString::from("dns:///svc:50051");
        let path = |i: usize| format!("/pkg.Service/Method{i:03}Call");
        let ids: Vec<MethodId> = (0..MAX_METHODS)
            .map(|i| table.find(&target, &path(i)))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            assert_ne!(*id, MethodId::OTHER, "method {i} is recorded as itself");
            assert_eq!(table.find(&target, &path(i)), *id, "found again");
            assert_eq!(&*table.get(&target, *id).method, &path(i)[1..]);
        }
        let mut distinct = ids.clone();
        distinct.sort_by_key(|id| id.0);
        distinct.dedup();
        assert_eq!(distinct.len(), MAX_METHODS);
        // Full: a new method is `other`, a known one is still itself.
        let late = table.find(&target, "/pkg.Service/Late");
        assert_eq!(late, MethodId::OTHER);
        assert_eq!(&*table.get(&target, late).method, "other");
        assert_eq!(table.find(&target, &path(7)), ids[7]);
    }

    /// A handle's method cache answers what the table answers, for static paths (found again
    /// by address), paths built per request, and paths that come and go: a path freed after
    /// its call, whose address the next path of the same length may take, is never taken for
    /// that next one (the cache keeps its bytes).
    #[test]
    fn method_cache_answers_as_the_table_does() {
        let metrics = PoolMetrics::new("svc:50051");
        let mut cache = MethodCache::default();
        let uri = |path: &str| -> http::Uri { format!("http://svc{path}").parse().unwrap() };
        let one = metrics.method("/pkg.S/One");
        let two = metrics.method("/pkg.S/Two");
        assert_ne!(one, two);

        let static_one = http::Uri::from_static("http://svc/pkg.S/One");
        for _ in 0..3 {
            assert_eq!(metrics.method_of(&mut cache, &static_one), one);
        }
        // Same bytes elsewhere, another method, back and forth.
        for _ in 0..3 {
            assert_eq!(metrics.method_of(&mut cache, &uri("/pkg.S/One")), one);
            assert_eq!(metrics.method_of(&mut cache, &uri("/pkg.S/Two")), two);
            assert_eq!(metrics.method_of(&mut cache, &static_one), one);
        }
        // Paths of one length, each dropped before the next is built: the allocator may hand
        // the next one the same address.
        for i in 0..64 {
            let (path, id) = if i % 2 == 0 {
                ("/pkg.S/One", one)
            } else {
                ("/pkg.S/Two", two)
            };
            let request = uri(path);
            assert_eq!(metrics.method_of(&mut cache, &request), id, "call {i}");
            drop(request);
        }
        // The same path built anew is answered from the kept one, which stays.
        assert_eq!(metrics.method_of(&mut cache, &static_one), one);
        assert_eq!(metrics.method_of(&mut cache, &uri("/pkg.S/One")), one);
        let kept = cache.last.as_ref().map(|(path, _)| path.as_str().as_ptr());
        assert_eq!(kept, Some(static_one.path().as_ptr()));
        // A clone of the handle starts from its cache; either answers as the table does.
        let mut copy = cache.clone();
        assert_eq!(metrics.method_of(&mut copy, &uri("/pkg.S/Two")), two);
        assert_eq!(metrics.method_of(&mut copy, &static_one), one);
    }

    /// The bucket bounds are gRFC A66's: 41 latency bounds from 0 to 100 s, 14 size bounds
    /// from 0 to 4 GiB, each list strictly increasing (an exporter takes them as given).
    #[test]
    fn bucket_bounds_are_a66s() {
        use super::{LATENCY_BUCKETS, SIZE_BUCKETS};
        for (bounds, n, last) in [
            (LATENCY_BUCKETS, 41, 100.0),
            (SIZE_BUCKETS, 14, 4294967296.0),
        ] {
            assert_eq!(bounds.len(), n);
            assert_eq!((bounds[0], bounds[n - 1]), (0.0, last));
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        }
        assert_eq!(LATENCY_BUCKETS[7], 0.001, "1 ms is the 8th latency bound");
        assert_eq!(SIZE_BUCKETS[1], 1024.0);
    }

    /// Message bytes are counted without their prefixes, however the frames split them: at
    /// every length, one frame per message (the fast path), and frames that hold a message and
    /// a part of the next, or a prefix that claims more than the frame has.
    #[test]
    fn message_bytes_skip_prefixes_across_splits() {
        let messages = [&b"hello"[..], b"", b"a longer message"];
        let mut stream = Vec::new();
        let mut framed = Vec::new();
        for message in messages {
            let mut frame = vec![0];
            frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
            frame.extend_from_slice(message);
            stream.extend_from_slice(&frame);
            framed.push(frame);
        }
        let count = |chunks: &mut dyn Iterator<Item = &[u8]>| {
            let mut bytes = MessageBytes::default();
            chunks.for_each(|chunk| bytes.feed(chunk));
            bytes.total
        };
        for split in 1..=stream.len() {
            assert_eq!(
                count(&mut stream.chunks(split)),
                21,
                "split every {split} bytes"
            );
        }
        assert_eq!(
            count(&mut framed.iter().map(Vec::as_slice)),
            21,
            "a frame per message"
        );
        // A frame ending inside the second message's prefix, then the rest.
        assert_eq!(count(&mut [&stream[..13], &stream[13..]].into_iter()), 21);
        // A frame whose prefix says 16 bytes with 3 of them in it: counted as they come.
        let (head, tail) = framed[2].split_at(8);
        assert_eq!(count(&mut [head, tail].into_iter()), 16);
    }
}
