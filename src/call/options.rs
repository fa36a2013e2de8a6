//! The options of one call, read from its request: its deadline (`grpc-timeout`, bounded by
//! the pool's timeout) and whether it waits for a Ready connection (gRPC's wait-for-ready).

use std::time::Duration;

use http::{HeaderMap, Request};
use tokio::time::Instant;

use crate::config::Config;

/// A per-call extension: wait for a Ready connection even when every connection is in
/// TransientFailure (gRPC's wait-for-ready), or not, overriding the pool's default.
///
/// ```
/// let mut request = tonic::Request::new(());
/// request.extensions_mut().insert(tonic_pool::WaitForReady(true));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitForReady(pub bool);

/// The options of one call, read from the request.
#[derive(Debug)]
pub(crate) struct CallOptions {
    pub(crate) deadline: Option<Instant>,
    pub(crate) wait_for_ready: bool,
    /// The call's method, for its metrics (set by [`CallOptions::with_method`]; until then
    /// `MethodId::NONE`, which records nothing).
    #[cfg(feature = "metrics")]
    pub(crate) method: crate::metrics::MethodId,
}

impl CallOptions {
    pub(crate) fn from_request<B>(req: &Request<B>, config: &Config) -> Self {
        let header = grpc_timeout(req.headers());
        let timeout = match (header, config.timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self {
            deadline: timeout.map(|t| Instant::now() + t),
            wait_for_ready: req
                .extensions()
                .get::<WaitForReady>()
                .map_or(config.wait_for_ready, |w| w.0),
            #[cfg(feature = "metrics")]
            method: crate::metrics::MethodId::NONE,
        }
    }

    /// The options, for a call of `method`.
    #[cfg(feature = "metrics")]
    #[inline]
    pub(crate) fn with_method(self, method: crate::metrics::MethodId) -> Self {
        Self { method, ..self }
    }
}

/// Parses gRPC's `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u, n).
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(v: &'static str) -> Option<Duration> {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static(v));
        grpc_timeout(&h)
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("400m"), Some(Duration::from_millis(400)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "1", "1x", "-1S", "123456789S", "1.5S"] {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(bad).unwrap());
            assert_eq!(grpc_timeout(&h), None, "{bad:?}");
        }
    }
}
