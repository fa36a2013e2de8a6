//! When a call may be sent again without the caller knowing (gRFC A6's transparent retry),
//! classified from the HTTP/2 error — never from the gRPC status, which tonic maps from these
//! to CANCELLED, INTERNAL or UNKNOWN.

use crate::call::body::transport_error;
use crate::error::Error;

/// How many times a call that no connection took (it never left this process, or its
/// connection was going away) is sent again, each time on another connection.
const MAX_UNSENT_RETRIES: usize = 5;

pub(crate) use crate::state::Retry;

/// The error h2 gives streams whose connection went away under them.
pub(crate) fn is_broken_pipe(err: &h2::Error) -> bool {
    err.get_io()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Classifies a send error from the HTTP/2 error, never from the gRPC status (tonic maps
/// these to CANCELLED, INTERNAL or UNKNOWN). h2 reports a *remote* GOAWAY error on a stream
/// only for streams above the GOAWAY's last stream id; streams the server may have processed
/// fail with an I/O error instead when the connection closes.
pub(crate) fn never_processed(h2: &h2::Error) -> Option<Retry> {
    if h2.is_go_away() && h2.is_remote() {
        Some(Retry::GoAway)
    } else if h2.is_reset() && h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Some(Retry::Refused)
    } else {
        None
    }
}

/// How often a call may be sent again without the caller knowing (gRFC A6).
///
/// - A call the server *refused* (`REFUSED_STREAM`: it reached the server, not its
///   application) goes again once, to another connection when there is one — a server that
///   refuses twice is overloaded, and more attempts would only add to it.
/// - A call that never left this process, or that a connection going away never took (above
///   its GOAWAY's last stream id), goes again on another connection — the one that could not
///   take it is out of use at once, so this is never a loop on one connection — up to
///   [`MAX_UNSENT_RETRIES`] times within the call's deadline. gRFC A6 allows one retry for a
///   GOAWAY'd stream too; but servers recycle their connections in lockstep (the same max
///   age, started together), so a retry often lands on a connection whose GOAWAY is already
///   on the wire, and one retry lost calls under load (1–3 in 13 000 with four connections
///   aged 1 s). No server refused those calls: their connections were closing.
#[derive(Debug, Default)]
pub(crate) struct Retries {
    /// Sends of a call that no connection took.
    untaken: usize,
    /// The one retry after `REFUSED_STREAM` is used.
    refused: bool,
}

impl Retries {
    /// Whether a call that failed for `retry`'s reason may go again.
    pub(crate) fn allows(&self, retry: Retry) -> bool {
        match retry {
            Retry::Refused => !self.refused,
            Retry::Unsent | Retry::GoAway | Retry::NotOpened => self.untaken < MAX_UNSENT_RETRIES,
        }
    }

    /// Counts one more send; fails with `error` when none is allowed.
    pub(crate) fn count(&mut self, retry: Retry, error: Option<h2::Error>) -> Result<(), Error> {
        if !self.allows(retry) {
            return Err(match error {
                Some(err) => transport_error(err),
                None => Error::unavailable("request could not be sent: no connection took it"),
            });
        }
        match retry {
            Retry::Refused => self.refused = true,
            Retry::Unsent | Retry::GoAway | Retry::NotOpened => self.untaken += 1,
        }
        Ok(())
    }
}

/// Why h2 would not open a stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unsent {
    /// The request itself cannot be sent (h2's user errors, e.g. malformed headers).
    Request,
    /// The connection cannot open streams any more: it failed, is going away, or has used
    /// up its stream ids (2^31 per connection).
    Connection(String),
}

pub(crate) fn unsent_cause(error: &h2::Error) -> Unsent {
    let user_error =
        !error.is_io() && !error.is_go_away() && !error.is_reset() && error.reason().is_none();
    if !user_error {
        return Unsent::Connection(format!(
            "connection cannot open streams: {}",
            crate::error::error_chain(error)
        ));
    }
    // h2 reports id exhaustion as a user error; it is the connection's, not the request's.
    if error.to_string().contains("stream ID overflowed") {
        Unsent::Connection("stream ids used up: connection replaced".to_owned())
    } else {
        Unsent::Request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused call goes again once; one no connection took, up to the bound; then the call
    /// fails (no loop).
    #[test]
    fn retries_follow_the_transparent_retry_rules() {
        let mut retries = Retries::default();
        assert!(retries.count(Retry::Refused, None).is_ok());
        assert!(!retries.allows(Retry::Refused));
        assert!(retries.count(Retry::Refused, None).is_err());
        for _ in 0..MAX_UNSENT_RETRIES {
            assert!(retries.allows(Retry::GoAway));
            retries.count(Retry::Unsent, None).unwrap();
        }
        assert!(!retries.allows(Retry::GoAway));
        assert!(retries.count(Retry::NotOpened, None).is_err());
    }
}
