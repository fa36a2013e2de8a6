//! Pick first: the first address, in resolver order, with a Ready connection.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::picker::{Choice, Pickable, Policy, Ready};

/// Every call to the first address that has an available connection, its connections in
/// turn (one `fetch_add`); the next address only while the earlier ones have none, and back
/// to the first as soon as it has one again.
///
/// When every connection of that address is full the pick stays there (reported as all full,
/// so that the address grows if it may): pick first means one backend, not spilling over.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickFirst;

impl Policy for PickFirst {
    #[inline]
    fn pick<'a, T: Pickable>(
        &self,
        ready: &'a Ready<T>,
        cursor: &AtomicUsize,
    ) -> Option<Choice<'a, T>> {
        let group = ready
            .groups()
            .iter()
            .enumerate()
            .find(|&(g, _)| ready.group(g).iter().any(Pickable::is_available))
            .map(|(_, group)| *group)?;
        let range = group.start..group.start + group.len;
        let index = if group.len == 1 {
            group.start
        } else {
            group.start + cursor.fetch_add(1, Ordering::Relaxed) % group.len
        };
        ready.walk(index, range, |_| false)
    }
}
