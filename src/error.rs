//! The crate's error type.
//!
//! One opaque [`Error`] with a private kind, `is_*()` predicates and a `source()` chain, as
//! tonic's and h2's errors are. Errors that end a call carry a [`tonic::Status`] in their
//! source chain, so that generated clients (which look for a `Status` there) report the right
//! gRPC code: `UNAVAILABLE` when no connection can take the call, `DEADLINE_EXCEEDED` when the
//! call's deadline passes while it waits, `UNAVAILABLE` with a shutdown message after
//! [`Pool::close`](crate::Pool::close).

use std::error::Error as StdError;
use std::fmt;

use crate::target::TargetError;

/// A boxed error, as tower and tonic use.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The sources of `err`, nearest first, at most 8 deep (chains are short; a cycle would be a
/// bug elsewhere, and this must not hang on one).
pub(crate) fn sources<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(err.source(), |e: &&'a (dyn StdError + 'static)| {
        (*e).source()
    })
    .take(8)
}

/// An error from the pool: building it, a call through it, or closing it.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: Kind,
    message: String,
    /// For call errors: the status a generated client will report.
    status: Option<tonic::Status>,
    source: Option<BoxError>,
    /// For [`Kind::Close`]: every failure that happened while closing.
    failures: Vec<Error>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    InvalidTarget,
    InvalidConfig,
    NoRuntime,
    Unavailable,
    DeadlineExceeded,
    Shutdown,
    Transport,
    Close,
}

impl Error {
    fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                status: None,
                source: None,
                failures: Vec::new(),
            }),
        }
    }

    fn with_status(mut self, status: tonic::Status) -> Self {
        self.inner.status = Some(status);
        self
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    pub(crate) fn invalid_target(err: TargetError) -> Self {
        Self::new(Kind::InvalidTarget, "invalid target").with_source(err)
    }

    pub(crate) fn invalid_config(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidConfig, message)
    }

    pub(crate) fn no_runtime() -> Self {
        Self::new(
            Kind::NoRuntime,
            "no tokio runtime: call build() inside a runtime, or pass one with PoolBuilder::runtime",
        )
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        let message = message.into();
        let status = tonic::Status::unavailable(message.clone());
        Self::new(Kind::Unavailable, message).with_status(status)
    }

    pub(crate) fn deadline_exceeded(message: impl Into<String>) -> Self {
        let message = message.into();
        let status = tonic::Status::deadline_exceeded(message.clone());
        Self::new(Kind::DeadlineExceeded, message).with_status(status)
    }

    pub(crate) fn shutdown() -> Self {
        let message = "pool is shut down";
        Self::new(Kind::Shutdown, message).with_status(tonic::Status::unavailable(message))
    }

    /// A transport failure during a call, reported with the gRPC code that fits it.
    pub(crate) fn transport(status: tonic::Status, source: impl Into<BoxError>) -> Self {
        Self::new(Kind::Transport, status.message().to_owned())
            .with_status(status)
            .with_source(source)
    }

    pub(crate) fn close(failures: Vec<Error>) -> Self {
        let mut err = Self::new(
            Kind::Close,
            format!("{} failure(s) while closing the pool", failures.len()),
        );
        err.inner.failures = failures;
        err
    }

    pub(crate) fn close_failure(message: impl Into<String>) -> Self {
        Self::new(Kind::Close, message)
    }

    /// The target string could not be parsed; the source is a [`TargetError`].
    pub fn is_invalid_target(&self) -> bool {
        self.inner.kind == Kind::InvalidTarget
    }

    /// A builder setting was out of range.
    pub fn is_invalid_config(&self) -> bool {
        self.inner.kind == Kind::InvalidConfig
    }

    /// `build()` was called outside a tokio runtime and no runtime was given.
    pub fn is_no_runtime(&self) -> bool {
        self.inner.kind == Kind::NoRuntime
    }

    /// No connection could take the call (every connection in TransientFailure).
    pub fn is_unavailable(&self) -> bool {
        self.inner.kind == Kind::Unavailable
    }

    /// The call's deadline passed before it could be sent or answered.
    pub fn is_deadline_exceeded(&self) -> bool {
        self.inner.kind == Kind::DeadlineExceeded
    }

    /// The pool was closed (or dropped) before the call.
    pub fn is_shutdown(&self) -> bool {
        self.inner.kind == Kind::Shutdown
    }

    /// The connection failed while carrying the call.
    pub fn is_transport(&self) -> bool {
        self.inner.kind == Kind::Transport
    }

    /// Closing the pool found failures; see [`Error::failures`].
    pub fn is_close(&self) -> bool {
        self.inner.kind == Kind::Close
    }

    /// The gRPC status this error stands for, when it ended a call.
    pub fn status(&self) -> Option<&tonic::Status> {
        self.inner.status.as_ref()
    }

    /// Every failure found while closing the pool (empty for other errors).
    pub fn failures(&self) -> &[Error] {
        &self.inner.failures
    }

    /// The [`TargetError`] behind an invalid target.
    pub fn target_error(&self) -> Option<&TargetError> {
        self.inner
            .source
            .as_ref()
            .and_then(|s| s.downcast_ref::<TargetError>())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("tonic_pool::Error");
        d.field("kind", &self.inner.kind)
            .field("message", &self.inner.message);
        if let Some(status) = &self.inner.status {
            d.field("code", &status.code());
        }
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        if !self.inner.failures.is_empty() {
            d.field("failures", &self.inner.failures);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)?;
        if self.inner.kind == Kind::InvalidTarget {
            if let Some(source) = &self.inner.source {
                write!(f, ": {source}")?;
            }
        }
        for (i, failure) in self.inner.failures.iter().enumerate() {
            write!(f, "; [{}] {failure}", i + 1)?;
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        // The status comes first: tonic walks the chain and stops at the first `Status`.
        if let Some(status) = &self.inner.status {
            return Some(status);
        }
        self.inner
            .source
            .as_ref()
            .map(|s| &**s as &(dyn StdError + 'static))
    }
}

/// Renders an error with its sources: `a: b: c`, without repeating a part that a source
/// already spells out (hyper's "connection error" over h2's "connection error: …").
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    for source in sources(err) {
        let text = source.to_string();
        let last = parts.last_mut().expect("never empty");
        if text.starts_with(last.as_str()) {
            *last = text;
        } else if !last.ends_with(&text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_clients_see_the_status() {
        let err: BoxError = Box::new(Error::deadline_exceeded("waited 1s for a connection"));
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        let err: BoxError = Box::new(Error::shutdown());
        assert_eq!(
            tonic::Status::from_error(err).code(),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn close_lists_every_failure() {
        let err = Error::close(vec![Error::close_failure("a"), Error::close_failure("b")]);
        assert!(err.is_close());
        assert_eq!(err.failures().len(), 2);
        assert_eq!(
            err.to_string(),
            "2 failure(s) while closing the pool; [1] a; [2] b"
        );
    }
}
