//! Least request: power of two choices on calls in flight (gRFC A48).

use std::sync::atomic::AtomicUsize;

use super::picker::{Choice, Pickable, Policy, Ready};

/// Of two different addresses drawn at random, the one with fewer calls in flight over its
/// available connections; then, of two of its connections, the one with fewer.
///
/// gRFC A48 with its default `choice_count` of 2. Its counters are the pool's own: a call is
/// counted on its connection from the pick until its response ends, whatever its status. An
/// address's load is the sum over its connections, so that adding connections to an address
/// does not make it look idle. The draws are distinct (see [`Balance::LeastRequest`]).
///
/// [`Balance::LeastRequest`]: super::Balance::LeastRequest
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastRequest;

impl Policy for LeastRequest {
    #[inline]
    fn pick<'a, T: Pickable>(
        &self,
        ready: &'a Ready<T>,
        _cursor: &AtomicUsize,
    ) -> Option<Choice<'a, T>> {
        ready.two_choices(address_load, |entry| {
            entry.is_available().then(|| entry.in_flight())
        })
    }
}

/// Calls in flight over an address's available connections; `None` when none is available.
fn address_load<T: Pickable>(entries: &[T]) -> Option<usize> {
    entries
        .iter()
        .filter(|e| e.is_available())
        .map(|e| e.in_flight())
        .reduce(|a, b| a + b)
}
