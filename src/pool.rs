//! [`Pool`]: the cheap, cloneable handle users give to generated clients.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::call::{self, CallOptions, ResponseBody};
use crate::config::Config;
use crate::connector::Connect;
use crate::error::Error;
use crate::mailbox::{mailbox, Mail, Mailbox, WeakMailbox};
use crate::registry::{ReadyPicker, Shared};
use crate::resolve::Source;
use crate::state::{ConnectivityState, PoolSnapshot, PoolSummary, StateEvents, StateWatch};
use crate::target::Target;
use crate::worker::Worker;

/// A pool of HTTP/2 connections behind one `tower::Service`, for tonic clients.
///
/// `Pool` is what a generated client takes in place of a `tonic::transport::Channel`:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// let pool = tonic_pool::Pool::builder("static:///127.0.0.2:50051,127.0.0.3:50051")
///     .connections_per_endpoint(4)
///     .build()?;
/// pool.wait_ready(Duration::from_secs(5)).await?;
/// // let mut client = EchoClient::new(pool.clone());
/// assert_eq!(pool.state(), tonic_pool::ConnectivityState::Ready);
/// pool.close().await?;
/// # Ok(()) }
/// ```
///
/// Clones are cheap and share everything. The pool's worker runs until [`Pool::close`] is
/// called or the last clone is dropped.
pub struct Pool {
    inner: Arc<Inner>,
    /// This handle's copy of the picker; reloaded only when the generation moves.
    cached: Arc<ReadyPicker>,
    cached_generation: u64,
    /// This handle's last method, for the calls' metrics.
    #[cfg(feature = "metrics")]
    methods: crate::metrics::MethodCache,
}

struct Inner {
    shared: Arc<Shared>,
    /// The worker's mailbox; dropping the last `Inner` closes it, which ends the worker.
    mailbox: Mailbox,
    /// The worker's task, awaited by the first `close()`: it returns once that task has ended.
    worker: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    scheme: Scheme,
    authority: Authority,
    user_agent: HeaderValue,
}

impl Pool {
    pub(crate) fn start(
        target: Target,
        config: Config,
        connector: Arc<dyn Connect>,
        addresses: Source,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let (scheme, authority) = origin(&target, &config);
        let user_agent = user_agent(&config);
        let (mailbox, inbox) = mailbox();
        let shared = Shared::new(config, target, runtime.clone(), WeakMailbox::new(&mailbox));
        let worker = Worker::new(shared.clone(), connector, addresses, inbox);
        let span = tracing::info_span!("tonic_pool", target = %shared.target);
        let worker = runtime.spawn(worker.run().instrument(span));
        let (cached_generation, cached) = shared.load_picker();
        Self {
            inner: Arc::new(Inner {
                shared,
                mailbox,
                worker: parking_lot::Mutex::new(Some(worker)),
                scheme,
                authority,
                user_agent,
            }),
            cached,
            cached_generation,
            #[cfg(feature = "metrics")]
            methods: crate::metrics::MethodCache::default(),
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The pool's aggregate connectivity state.
    pub fn state(&self) -> ConnectivityState {
        self.shared().state()
    }

    /// A handle that watches the aggregate state.
    pub fn watch(&self) -> StateWatch {
        StateWatch::new(self.shared().subscribe_state())
    }

    /// Every state transition of the pool, its endpoints and its connections, in order, from
    /// now on.
    ///
    /// The pool's and its endpoints' transitions are never lost, however many connections
    /// change meanwhile. A receiver that falls more than 4096 connection transitions behind
    /// (a large pool starting or closing) misses the oldest of those: its next `recv` fails
    /// with `RecvError::Lagged(n)`, `n` the number it missed, and the one after goes on
    /// (see [`StateEvents`]).
    pub fn events(&self) -> StateEvents {
        self.shared().subscribe_events()
    }

    /// Waits until the state differs from `from`, for at most `timeout`. Returns whether it
    /// changed (gRPC's `WaitForStateChange`, with a timeout rather than a deadline, like every
    /// wait of the pool). Returns at once if the state is already not `from`.
    pub async fn wait_for_state_change(&self, from: ConnectivityState, timeout: Duration) -> bool {
        let mut rx = self.shared().subscribe_state();
        let changed = crate::state::wait_until(&mut rx, |s| *s != from);
        matches!(tokio::time::timeout(timeout, changed).await, Ok(Some(_)))
    }

    /// Leaves Idle: starts resolving and connecting if the pool was built with
    /// [`connect_lazily`](crate::PoolBuilder::connect_lazily) or went Idle after its
    /// [`idle_timeout`](crate::PoolBuilder::idle_timeout). Does nothing otherwise.
    pub fn connect(&self) {
        self.shared().request_connect();
    }

    /// Makes every connection that is backing off after a failure (TransientFailure) try
    /// again at once, its backoff restarted from the initial delay (grpc-go's
    /// `ClientConn.ResetConnectBackoff`): for when the caller knows the servers are back (the
    /// network came up, a deployment finished). A connection that is connecting now starts
    /// its next backoff from the initial delay.
    pub fn reset_connect_backoff(&self) {
        self.shared().reset_connect_backoff();
    }

    /// Waits until the pool is Ready, for at most `timeout`, starting to connect if Idle.
    ///
    /// Fails with a deadline error (carrying the last connection error) on timeout, and with
    /// a shutdown error if the pool is closed meanwhile.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), Error> {
        self.connect();
        let mut rx = self.shared().subscribe_state();
        let wait = crate::state::wait_until(&mut rx, |s| {
            matches!(s, ConnectivityState::Ready | ConnectivityState::Shutdown)
        });
        match tokio::time::timeout(timeout, wait).await {
            Ok(Some(ConnectivityState::Ready)) => Ok(()),
            Ok(_) => Err(Error::shutdown()),
            Err(_) => {
                let last = self.shared().last_error().unwrap_or_else(|| "none".into());
                Err(Error::deadline_exceeded(format!(
                    "pool not ready after {timeout:?} (state {}); last error: {last}",
                    self.state()
                )))
            }
        }
    }

    /// Waits until `condition` holds for the pool's snapshot, for at most `timeout`; returns
    /// whether it did. It re-checks after changes of a state, an endpoint or a connection,
    /// never by polling a clock (counters such as calls in flight do not wake it on their own).
    ///
    /// A snapshot lists every connection, so its cost grows with the pool (about 20 ms at
    /// 16 000 connections). In a pool of more than 400 connections the checks are spaced —
    /// the next one no sooner than 2.5 µs per connection, and ten times as long as the last
    /// check took, after the last; every change made meanwhile is seen by the next check —
    /// so that waiting takes at most about a tenth of a core however fast the pool changes;
    /// it then returns up to that spacing after the condition came to hold. In smaller pools
    /// it checks after every change. For a condition on counts (how many
    /// connections are Ready, the pool's state), [`wait_until_summary`](Self::wait_until_summary)
    /// costs O(1) per change at any size.
    pub async fn wait_until<F>(&self, timeout: Duration, condition: F) -> bool
    where
        F: FnMut(&PoolSnapshot) -> bool,
    {
        let wait = self.shared().wait_until_snapshot(condition);
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// The pool in a few numbers — its state, its connections and endpoints per state, calls
    /// in flight — from counts it keeps up to date on every change: O(1), whatever the
    /// pool's size (a [`snapshot`](Self::snapshot) is O(n)).
    pub fn summary(&self) -> PoolSummary {
        self.shared().summary()
    }

    /// Waits until `condition` holds for the pool's [`summary`](Self::summary), for at most
    /// `timeout`; returns whether it did. It re-checks after every change of a state, an
    /// endpoint or a connection, each check O(1): the way to wait for a large pool, e.g. for
    /// every connection to be Ready:
    ///
    /// ```no_run
    /// # async fn demo(pool: tonic_pool::Pool) {
    /// use std::time::Duration;
    /// let all_ready = pool
    ///     .wait_until_summary(Duration::from_secs(10), |s| {
    ///         s.connections.ready == s.connections.total()
    ///     })
    ///     .await;
    /// # }
    /// ```
    ///
    /// Counters such as calls in flight do not wake it on their own.
    pub async fn wait_until_summary<F>(&self, timeout: Duration, mut condition: F) -> bool
    where
        F: FnMut(&PoolSummary) -> bool,
    {
        let shared = self.shared();
        let mut version = shared.subscribe_version();
        let wait = async {
            loop {
                version.borrow_and_update();
                if condition(&shared.summary()) {
                    return true;
                }
                if version.changed().await.is_err() {
                    return condition(&shared.summary());
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// A point-in-time view of every endpoint and connection: address, state, calls in flight.
    pub fn snapshot(&self) -> PoolSnapshot {
        self.shared().snapshot()
    }

    /// The target this pool serves.
    pub fn target(&self) -> &Target {
        &self.shared().target
    }

    /// Closes the pool: new calls fail at once with a shutdown error (UNAVAILABLE), calls in
    /// flight may finish for up to the [close timeout](crate::PoolBuilder::close_timeout), then
    /// every connection is closed and the worker ends.
    ///
    /// Connection tasks then get until the close timeout has passed since `close()` was
    /// called — and at least 5 s, however long the calls took — to stop; only those still
    /// running after that are aborted (and reported). So `close()` returns within the close
    /// timeout plus 5 s, and a close that is merely slow (thousands of connections) is not a
    /// failure.
    ///
    /// Returns an error listing every failure (calls cut by the timeout, connection tasks
    /// that failed or had to be aborted), not only the first or the last. Closing twice is fine; the second call
    /// returns `Ok(())` once the pool is closed.
    pub async fn close(&self) -> Result<(), Error> {
        let shared = self.shared();
        shared.shut_down("close() called");
        let mut failures = Vec::new();
        let timeout = shared.config.close_timeout;
        if tokio::time::timeout(timeout, shared.in_flight.wait_zero())
            .await
            .is_err()
        {
            failures.push(Error::close_failure(format!(
                "{} call(s) still in flight after the close timeout of {timeout:?}; they were cut",
                shared.in_flight.get()
            )));
        }
        let (reply, answer) = oneshot::channel();
        if self.inner.mailbox.send(Mail::Close(reply)).is_ok() {
            // An error means another close() got there first and the worker is gone.
            if let Ok(worker_failures) = answer.await {
                failures.extend(worker_failures);
            }
        }
        // The worker answered as its last act; wait for its task to be gone too, so that no
        // task of the pool outlives close() (its connection tasks ended before it answered).
        let worker = self.inner.worker.lock().take();
        if let Some(worker) = worker {
            if let Err(e) = worker.await {
                if e.is_panic() {
                    failures.push(Error::close_failure(format!("pool worker panicked: {e}")));
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::close(failures))
        }
    }

    /// Picks a Ready connection without waiting, refreshing this handle's picker only when its
    /// generation moved, and counts the call on it at once, so that a burst of calls made
    /// before any of them is polled still sees connections fill up (and grows the endpoint).
    fn pick(&mut self) -> Option<crate::conn::InFlightGuard> {
        let shared = &self.inner.shared;
        if shared.generation() != self.cached_generation {
            let (generation, picker) = shared.load_picker();
            self.cached = picker;
            self.cached_generation = generation;
        }
        let (conn, all_full) = self.cached.pick_reporting(&shared.cursor)?;
        if all_full {
            shared.request_growth(&conn.addr);
        }
        Some(conn.start_call())
    }

    /// Gives the request the pool's scheme, authority and user agent.
    fn prepare(&self, req: &mut Request<tonic::body::Body>) -> Result<(), Error> {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(self.inner.scheme.clone());
        parts.authority = Some(self.inner.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts)
            .map_err(|e| Error::invalid_config(format!("cannot build request URI: {e}")))?;
        let headers = req.headers_mut();
        strip_connection_headers(headers);
        // As tonic does: the caller's user agent first, the pool's after it.
        match headers.try_insert(http::header::USER_AGENT, self.inner.user_agent.clone()) {
            Ok(Some(theirs)) => {
                let mut both = theirs.as_bytes().to_vec();
                both.push(b' ');
                both.extend_from_slice(self.inner.user_agent.as_bytes());
                if let Ok(value) = HeaderValue::from_bytes(&both) {
                    headers.insert(http::header::USER_AGENT, value);
                }
            }
            Ok(None) => {}
            Err(_) => {
                // Too many headers for the map: h2 will refuse the request with a clear error.
            }
        }
        Ok(())
    }
}

/// Removes the headers HTTP/2 forbids in a request (RFC 9113 §8.2.2), as hyper does before it
/// hands a request to h2: `connection` and the headers it names, `keep-alive`,
/// `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` unless it is `trailers`.
///
/// h2 refuses a request that carries any of them, and a user can add them as metadata; the
/// call must not fail for it (a `Channel` sends the same request fine). One pass over the
/// headers, without allocation, on every call: the removal itself only runs when one is there.
fn strip_connection_headers(headers: &mut http::HeaderMap) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    let forbidden = |name: &http::HeaderName, value: &HeaderValue| {
        name == CONNECTION
            || name == TRANSFER_ENCODING
            || name == UPGRADE
            || name == "keep-alive"
            || name == "proxy-connection"
            || (name == TE && value != "trailers")
    };
    if !headers.iter().any(|(name, value)| forbidden(name, value)) {
        return;
    }
    if let Some(connection) = headers.remove(CONNECTION) {
        tracing::trace!(
            header = "connection",
            "connection-specific header removed (illegal in HTTP/2)"
        );
        if let Ok(names) = connection.to_str() {
            for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                headers.remove(name);
            }
        }
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        if headers.remove(name).is_some() {
            tracing::trace!(
                header = name,
                "connection-specific header removed (illegal in HTTP/2)"
            );
        }
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        tracing::trace!(
            header = "te",
            "te other than \"trailers\" removed (illegal in HTTP/2)"
        );
        headers.remove(TE);
    }
}

fn origin(target: &Target, config: &Config) -> (Scheme, Authority) {
    if let Some(origin) = &config.origin {
        // Validated by the builder: both are present.
        if let (Some(scheme), Some(authority)) = (origin.scheme(), origin.authority()) {
            return (scheme.clone(), authority.clone());
        }
    }
    let scheme = if target.is_tls() {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    // The target parser only accepts hosts and ports that make a valid authority.
    let authority = Authority::try_from(target.authority())
        .unwrap_or_else(|_| Authority::from_static("localhost"));
    (scheme, authority)
}

fn user_agent(config: &Config) -> HeaderValue {
    const OURS: &str = concat!("tonic-pool/", env!("CARGO_PKG_VERSION"));
    match &config.user_agent {
        Some(ua) => {
            let mut bytes = ua.as_bytes().to_vec();
            bytes.push(b' ');
            bytes.extend_from_slice(OURS.as_bytes());
            HeaderValue::from_bytes(&bytes).unwrap_or(HeaderValue::from_static(OURS))
        }
        None => HeaderValue::from_static(OURS),
    }
}

impl Clone for Pool {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cached: self.cached.clone(),
            cached_generation: self.cached_generation,
            #[cfg(feature = "metrics")]
            methods: self.methods.clone(),
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.shared().target.as_str())
            .field("state", &self.state())
            .field("ready_connections", &self.cached.len())
            .finish()
    }
}

impl tower_service::Service<Request<tonic::body::Body>> for Pool {
    type Response = Response<ResponseBody>;
    type Error = Error;
    type Future = ResponseFuture;

    /// Always ready: waiting for a connection happens in the response future, where the
    /// call's deadline is known (see [`crate::WaitForReady`]).
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<tonic::body::Body>) -> ResponseFuture {
        let shared = self.inner.shared.clone();
        if shared.is_shut_down() {
            return ResponseFuture::ready(Err(Error::shutdown()));
        }
        if let Err(e) = self.prepare(&mut req) {
            return ResponseFuture::ready(Err(e));
        }
        shared.note_call();
        let options = CallOptions::from_request(&req, &shared.config);
        #[cfg(feature = "metrics")]
        let options = options.with_method(shared.metrics.method_of(&mut self.methods, req.uri()));
        let first = self.pick();
        ResponseFuture {
            inner: Box::pin(call::run(shared, first, req, options)),
        }
    }
}

/// The future of a call through the pool.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Error>> + Send>>,
}

impl ResponseFuture {
    fn ready(result: Result<Response<ResponseBody>, Error>) -> Self {
        Self {
            inner: Box::pin(std::future::ready(result)),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

// A pool is handed across tasks and threads by every user; keep it so.
const _: () = {
    const fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    assert_traits::<Pool>();
    const fn assert_send<T: Send + 'static>() {}
    assert_send::<ResponseFuture>();
};
