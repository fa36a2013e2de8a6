//! Keeping a server stream alive across server restarts.
//!
//! A long-lived server stream (watch, subscribe, tail) dies with the connection it runs on:
//! when a pod recycles, the stream fails with UNAVAILABLE even though the pool already routes
//! new calls elsewhere. [`ResilientStream`] reopens it through your own `open` function (so you
//! decide what to ask for on a reopen, e.g. "resume after sequence n"), with gRPC connection
//! backoff between failed attempts, and tells you each time it did so.
//!
//! It uses no part of the pool (only its backoff): it works the same over a generated client
//! on a plain tonic `Channel`. It lives in this crate because a pool makes reopening cheap —
//! the new stream goes to a Ready connection at once — not because it needs one.
//!
//! ```no_run
//! # use tonic_pool::stream::{ResilientStream, StreamEvent};
//! # async fn demo(
//! #     open: impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<tonic::Response<tonic::Streaming<u32>>, tonic::Status>> + Send>> + Send + 'static,
//! # ) {
//! // `open` calls the generated client, e.g.
//! //   move || { let mut c = client.clone(); let after = last_seen.clone();
//! //             Box::pin(async move { c.watch(request_after(&after)).await }) }
//! // Give the opening request WaitForReady(true) so a reopen waits for a Ready connection.
//! let mut stream = ResilientStream::new(open);
//! while let Some(event) = stream.next().await {
//!     match event {
//!         Ok(StreamEvent::Message(m)) => { /* handle m */ }
//!         Ok(StreamEvent::Reconnected { reconnects, cause }) => {
//!             // Messages sent while the stream was down are not replayed by the server.
//!             eprintln!("stream reopened ({reconnects}) after: {cause}");
//!         }
//!         Ok(_) => {} // future kinds of events
//!         Err(status) => { eprintln!("stream failed for good: {status}"); break; }
//!     }
//! }
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_core::Stream;
use tonic::{Code, Status, Streaming};

use crate::backoff::{Backoff, BackoffConfig, FastRng};

type OpenFuture<T> =
    Pin<Box<dyn Future<Output = Result<tonic::Response<Streaming<T>>, Status>> + Send>>;
type Open<T> = Box<dyn FnMut() -> OpenFuture<T> + Send>;

/// What a [`ResilientStream`] yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum StreamEvent<T> {
    /// A message from the server.
    Message(T),
    /// The stream broke and was opened again; messages the server sent in between were lost
    /// unless your `open` function asked to resume.
    Reconnected {
        /// How many times the stream has been reopened so far.
        reconnects: u64,
        /// The status the broken stream ended with.
        cause: Status,
    },
}

enum State<T> {
    /// Waiting before the next attempt.
    Backoff(Pin<Box<tokio::time::Sleep>>),
    Opening(OpenFuture<T>),
    Streaming(Box<Streaming<T>>),
    Done,
}

/// A server stream that reopens itself when it fails with a retryable status.
///
/// By default it reopens on UNAVAILABLE (what the pool reports when a connection is lost),
/// without limit, with gRPC's connection backoff between failed opens; a stream that ends
/// normally ends this one too.
pub struct ResilientStream<T> {
    open: Open<T>,
    state: State<T>,
    backoff_config: BackoffConfig,
    backoff: Backoff,
    /// Failed opens since the last success (the first reopen after a break is immediate).
    failures: u32,
    retry_on: Vec<Code>,
    reconnect_on_end: bool,
    max_reconnects: Option<u64>,
    reconnects: u64,
    opened: bool,
    /// Why the stream is being reopened (reported with the reconnect).
    cause: Option<Status>,
}

impl<T> ResilientStream<T> {
    /// A stream opened (and reopened) by `open`, which typically calls a generated client's
    /// server-streaming method through the pool.
    pub fn new<F, Fut>(mut open: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<tonic::Response<Streaming<T>>, Status>> + Send + 'static,
    {
        let config = BackoffConfig::default();
        let mut open: Open<T> = Box::new(move || Box::pin(open()));
        let first = open();
        Self {
            open,
            state: State::Opening(first),
            backoff: Backoff::new(config.clone(), FastRng::random_seed()),
            backoff_config: config,
            failures: 0,
            retry_on: vec![Code::Unavailable],
            reconnect_on_end: false,
            max_reconnects: None,
            reconnects: 0,
            opened: false,
            cause: None,
        }
    }

    /// The backoff between failed attempts to reopen.
    ///
    /// Defaults to gRPC's connection backoff (1 s, ×1.6, ±20 %, max 120 s).
    #[must_use]
    pub fn backoff(mut self, config: BackoffConfig) -> Self {
        self.backoff = Backoff::new(config.clone(), FastRng::random_seed());
        self.backoff_config = config;
        self
    }

    /// The status codes that make it reopen.
    ///
    /// Defaults to `[Unavailable]`.
    #[must_use]
    pub fn retry_on(mut self, codes: &[Code]) -> Self {
        self.retry_on = codes.to_vec();
        self
    }

    /// Whether a stream that the server ends normally is reopened too.
    ///
    /// Defaults to `false`.
    #[must_use]
    pub fn reconnect_on_end(mut self, reconnect: bool) -> Self {
        self.reconnect_on_end = reconnect;
        self
    }

    /// Gives up (yielding the last error) after this many reopens.
    ///
    /// Defaults to no limit.
    #[must_use]
    pub fn max_reconnects(mut self, max: u64) -> Self {
        self.max_reconnects = Some(max);
        self
    }

    /// How many times the stream was reopened.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The next event, or `None` when the stream ended for good.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: all progress lives in `self`.
    pub async fn next(&mut self) -> Option<Result<StreamEvent<T>, Status>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn retryable(&self, status: &Status) -> bool {
        self.retry_on.contains(&status.code())
            && self.max_reconnects.is_none_or(|max| self.reconnects < max)
    }

    /// The stream broke (or ended) with `cause`: schedule a reopen.
    fn schedule_reopen(&mut self, cause: Status) {
        self.cause = Some(cause);
        self.state = if self.failures == 0 {
            State::Opening((self.open)())
        } else {
            State::Backoff(Box::pin(tokio::time::sleep(self.backoff.next_delay())))
        };
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<StreamEvent<T>, Status>>> {
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(None),
                State::Backoff(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    self.state = State::Opening((self.open)());
                }
                State::Opening(opening) => match ready!(opening.as_mut().poll(cx)) {
                    Ok(response) => {
                        self.state = State::Streaming(Box::new(response.into_inner()));
                        self.failures = 0;
                        self.backoff =
                            Backoff::new(self.backoff_config.clone(), FastRng::random_seed());
                        if self.opened {
                            self.reconnects += 1;
                            let cause = self.cause.take().unwrap_or_else(|| Status::ok(""));
                            return Poll::Ready(Some(Ok(StreamEvent::Reconnected {
                                reconnects: self.reconnects,
                                cause,
                            })));
                        }
                        self.opened = true;
                    }
                    Err(status) if self.opened && self.retryable(&status) => {
                        self.failures += 1;
                        self.state =
                            State::Backoff(Box::pin(tokio::time::sleep(self.backoff.next_delay())));
                    }
                    Err(status) => {
                        self.state = State::Done;
                        return Poll::Ready(Some(Err(status)));
                    }
                },
                State::Streaming(stream) => match ready!(Pin::new(&mut **stream).poll_next(cx)) {
                    Some(Ok(message)) => {
                        return Poll::Ready(Some(Ok(StreamEvent::Message(message))))
                    }
                    Some(Err(status)) if self.retryable(&status) => {
                        tracing::debug!(%status, "stream broke; reopening");
                        self.schedule_reopen(status);
                    }
                    Some(Err(status)) => {
                        self.state = State::Done;
                        return Poll::Ready(Some(Err(status)));
                    }
                    None if self.reconnect_on_end
                        && self.max_reconnects.is_none_or(|max| self.reconnects < max) =>
                    {
                        self.schedule_reopen(Status::ok("stream ended"));
                    }
                    None => {
                        self.state = State::Done;
                        return Poll::Ready(None);
                    }
                },
            }
        }
    }
}

impl<T> Stream for ResilientStream<T> {
    type Item = Result<StreamEvent<T>, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}

impl<T> Unpin for ResilientStream<T> {}

impl<T> fmt::Debug for ResilientStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Backoff(_) => "backoff",
            State::Opening(_) => "opening",
            State::Streaming(_) => "streaming",
            State::Done => "done",
        };
        f.debug_struct("ResilientStream")
            .field("state", &state)
            .field("reconnects", &self.reconnects)
            .field("retry_on", &self.retry_on)
            .finish()
    }
}
