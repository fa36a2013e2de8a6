//! The tuner behind the `tonic-pool-tune` binary (feature `tune`): measures a real endpoint
//! with N = 1, 2, 4, … connections per endpoint and recommends `connections_per_endpoint`.
//!
//! An L4 load balancer spreads connections, not calls, so the right N depends on how many
//! backends stand behind it, how it hashes, and where the server's stream limit bites — none
//! of which a client can see. So the tuner measures:
//!
//! - [`sweep`]: which N to try (doubling, then bisecting below the knee) and the knee rule;
//! - [`step`]: one N: a fresh [`Pool`](crate::Pool), `--concurrency` calls in
//!   flight for `--step-duration`, latencies in a fixed-size [`Latencies`] histogram, failed
//!   calls by code and, with `--backend-header`, which backend answered each call;
//! - [`RawCodec`]: requests and responses as raw message bytes over tonic's `Grpc`, so no
//!   protobuf definition of the user's service is needed;
//! - [`Report`]: the table, the SVG plot, the builder line and the recommendation;
//! - [`args`]: the command line, parsed by hand so the library takes no CLI dependency.
//!
//! It is a tool, not the pool's API: its types may change with the binary's needs.

pub mod args;
mod codec;
mod histogram;
mod report;
pub mod step;
pub mod sweep;

use std::fmt;

pub use args::{parse_args, Command, Options, UsageError, USAGE};
pub use codec::RawCodec;
pub use histogram::Latencies;
pub use report::Report;
pub use step::Step;
pub use sweep::{knee, run, KneeKind};

use tonic::{Code, Status};

/// Why a sweep stopped: every variant says what went wrong in terms of the tool's input.
#[derive(Debug)]
#[non_exhaustive]
pub enum TuneError {
    /// The pool would not take the target (or another setting).
    InvalidTarget {
        /// The target given.
        target: String,
        /// The pool's error.
        source: crate::Error,
    },
    /// No connection to the target became Ready.
    Connect {
        /// The target given.
        target: String,
        /// The pool's last connection (or resolution) error.
        last_error: String,
    },
    /// The server refused the credentials (`UNAUTHENTICATED`).
    Unauthenticated {
        /// The server's status.
        status: Status,
    },
    /// The server refused the call (`PERMISSION_DENIED`).
    PermissionDenied {
        /// The server's status.
        status: Status,
    },
    /// The server does not serve the method (`UNIMPLEMENTED`).
    Unimplemented {
        /// The method called.
        method: String,
        /// The server's status.
        status: Status,
    },
    /// Calls failed in a way that measuring cannot get past: a bad request
    /// (`INVALID_ARGUMENT`, `NOT_FOUND`) or no call succeeding at all.
    CallFailed {
        /// The status that stopped the sweep.
        status: Status,
    },
}

impl TuneError {
    /// The error for a status that stops the sweep.
    pub(crate) fn from_status(status: Status, method: &str) -> Self {
        match status.code() {
            Code::Unauthenticated => Self::Unauthenticated { status },
            Code::PermissionDenied => Self::PermissionDenied { status },
            Code::Unimplemented => Self::Unimplemented {
                method: method.to_owned(),
                status,
            },
            _ => Self::CallFailed { status },
        }
    }
}

impl fmt::Display for TuneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidTarget { target, source } => match source.target_error() {
                Some(why) => write!(f, "invalid target {target:?}: {why}"),
                None => write!(f, "the pool rejected its settings: {source}"),
            },
            Self::Connect { target, last_error } => write!(
                f,
                "connect error: cannot reach {target:?}; the pool's last error: {last_error}"
            ),
            Self::Unauthenticated { status } => write!(
                f,
                "authentication failed ({}); pass credentials with \
                 --metadata authorization=...",
                status_text("UNAUTHENTICATED", status)
            ),
            Self::PermissionDenied { status } => write!(
                f,
                "permission denied ({})",
                status_text("PERMISSION_DENIED", status)
            ),
            Self::Unimplemented { method, status } => write!(
                f,
                "method not found: the server does not implement {method} ({}); \
                 pick one with --method /package.Service/Method",
                status_text("UNIMPLEMENTED", status)
            ),
            Self::CallFailed { status } => write!(
                f,
                "calls failed ({}); check --method and the request bytes",
                status_text(&format!("{:?}", status.code()), status)
            ),
        }
    }
}

/// `CODE: message`, or `CODE` alone when the server sent no message.
fn status_text(code: &str, status: &Status) -> String {
    if status.message().is_empty() {
        code.to_owned()
    } else {
        format!("{code}: {}", status.message())
    }
}

impl std::error::Error for TuneError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::InvalidTarget { source, .. } => Some(source),
            _ => None,
        }
    }
}
